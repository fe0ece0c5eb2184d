//! The non-apply patch types: JSON merge patch (RFC 7386), JSON patch (RFC 6902) and the part of
//! strategic merge patch that kube-rs users send.
//!
//! Strategic merge patch covers: maps merge as in a merge patch (`null` deletes); lists of
//! objects merge by their merge key where [`merge_key`] knows one (`containers`,
//! `initContainers`, `ephemeralContainers`, `env`, `volumes`, `imagePullSecrets` by `name`;
//! `volumeMounts` by `mountPath`; `conditions` by `type`; `ports` by `containerPort` when the
//! items have one, else by `port`); every other list is replaced whole. Not covered: the
//! `$patch` (`replace`, `delete`, `merge`), `$retainKeys`, `$deleteFromPrimitiveList` and
//! `$setElementOrder` directives (a patch using one is refused with 400), and merge keys of
//! built-in fields beyond those listed. On custom resources the API server refuses strategic
//! merge patches (415), and so does this.

use serde_json::{Map, Value};

use crate::error::ApiError;

/// RFC 7386: objects merge, `null` deletes, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let target = target.as_object_mut().expect("made an object above");
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// The merge key of a list field whose items are objects, for strategic merge patch and
/// server-side apply of built-in resources (whose Go types declare them; the fake has no types,
/// so it knows these by field name).
pub fn merge_key(field: &str, items: &[&Value]) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets" => "name",
        "volumeMounts" => "mountPath",
        "conditions" => "type",
        "ports" if items.iter().any(|i| i.get("containerPort").is_some()) => "containerPort",
        "ports" => "port",
        _ => return None,
    })
}

/// Strategic merge patch, the subset described in the module documentation.
pub fn strategic_merge_patch(target: &mut Value, patch: &Value) -> Result<(), ApiError> {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return Ok(());
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let target = target.as_object_mut().expect("made an object above");
    for (key, value) in patch {
        if key.starts_with('$') {
            return Err(ApiError::bad_request(format!(
                "strategic merge patch directive {key} is not supported by this test server"
            )));
        }
        if value.is_null() {
            target.remove(key);
            continue;
        }
        match (target.get_mut(key), value) {
            (Some(Value::Array(current)), Value::Array(items)) => {
                let all: Vec<&Value> = current.iter().chain(items).collect();
                let objects = all.iter().all(|i| i.is_object());
                match merge_key(key, &all).filter(|_| objects) {
                    Some(merge_key) => merge_list(current, items, merge_key)?,
                    None => *current = items.clone(),
                }
            }
            (Some(current), Value::Object(_)) if current.is_object() => {
                strategic_merge_patch(current, value)?;
            }
            _ => {
                let mut fresh = Value::Null;
                strategic_merge_patch(&mut fresh, value)?;
                target.insert(key.clone(), fresh);
            }
        }
    }
    Ok(())
}

fn merge_list(current: &mut Vec<Value>, items: &[Value], merge_key: &str) -> Result<(), ApiError> {
    for item in items {
        let key = item.get(merge_key);
        match current
            .iter_mut()
            .find(|c| key.is_some() && c.get(merge_key) == key)
        {
            Some(existing) => strategic_merge_patch(existing, item)?,
            None => {
                let mut fresh = Value::Null;
                strategic_merge_patch(&mut fresh, item)?;
                current.push(fresh);
            }
        }
    }
    Ok(())
}

/// RFC 6902, all six operations; a failed `test` or a missing path is a 422 as in the API server.
pub fn json_patch(target: &mut Value, patch: &Value) -> Result<(), ApiError> {
    let Value::Array(operations) = patch else {
        return Err(ApiError::bad_request(
            "json patch must be a list of operations",
        ));
    };
    for operation in operations {
        let op = operation["op"].as_str().unwrap_or("");
        let path = operation["path"]
            .as_str()
            .ok_or_else(|| ApiError::bad_request("json patch operation without a path"))?;
        let value = || {
            operation
                .get("value")
                .cloned()
                .ok_or_else(|| ApiError::bad_request(format!("{op} operation needs a value")))
        };
        let from = || {
            operation["from"]
                .as_str()
                .ok_or_else(|| ApiError::bad_request(format!("{op} operation needs a from")))
        };
        match op {
            "add" => add(target, path, value()?)?,
            "remove" => {
                remove(target, path)?;
            }
            "replace" => {
                remove(target, path)?;
                add(target, path, value()?)?;
            }
            "move" => {
                let moved = remove(target, from()?)?;
                add(target, path, moved)?;
            }
            "copy" => {
                let copied = target
                    .pointer(from()?)
                    .cloned()
                    .ok_or_else(|| missing(from().unwrap_or_default()))?;
                add(target, path, copied)?;
            }
            "test" => {
                if target.pointer(path) != Some(&value()?) {
                    return Err(ApiError::new(
                        422,
                        "Invalid",
                        format!("testing value {path} failed"),
                    ));
                }
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unexpected json patch operation {other:?}"
                )))
            }
        }
    }
    Ok(())
}

fn missing(path: &str) -> ApiError {
    ApiError::new(
        422,
        "Invalid",
        format!("the server rejected our request due to an error in our request: doc is missing path: {path:?}"),
    )
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

fn parent<'a>(target: &'a mut Value, path: &str) -> Result<(&'a mut Value, String), ApiError> {
    let (parent, last) = path.rsplit_once('/').ok_or_else(|| missing(path))?;
    let parent_value = target.pointer_mut(parent).ok_or_else(|| missing(path))?;
    Ok((parent_value, unescape(last)))
}

fn add(target: &mut Value, path: &str, value: Value) -> Result<(), ApiError> {
    if path.is_empty() {
        *target = value;
        return Ok(());
    }
    let (parent, last) = parent(target, path)?;
    match parent {
        Value::Object(map) => {
            map.insert(last, value);
        }
        Value::Array(items) if last == "-" => items.push(value),
        Value::Array(items) => {
            let at: usize = last.parse().map_err(|_| missing(path))?;
            if at > items.len() {
                return Err(missing(path));
            }
            items.insert(at, value);
        }
        _ => return Err(missing(path)),
    }
    Ok(())
}

fn remove(target: &mut Value, path: &str) -> Result<Value, ApiError> {
    let (parent, last) = parent(target, path)?;
    match parent {
        Value::Object(map) => map.remove(&last).ok_or_else(|| missing(path)),
        Value::Array(items) => {
            let at: usize = last.parse().map_err(|_| missing(path))?;
            if at >= items.len() {
                return Err(missing(path));
            }
            Ok(items.remove(at))
        }
        _ => Err(missing(path)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_merges_maps_deletes_nulls_and_replaces_lists() {
        let mut v = json!({"a": {"b": 1, "c": 2}, "l": [1, 2]});
        merge_patch(&mut v, &json!({"a": {"b": null, "d": 3}, "l": [3]}));
        assert_eq!(v, json!({"a": {"c": 2, "d": 3}, "l": [3]}));
    }

    #[test]
    fn strategic_merge_patch_merges_containers_by_name() {
        let mut v = json!({"spec": {"containers": [
            {"name": "app", "image": "a:1", "env": [{"name": "X", "value": "1"}]},
            {"name": "side", "image": "s:1"}
        ], "args": ["x"]}});
        strategic_merge_patch(
            &mut v,
            &json!({"spec": {"containers": [
                {"name": "app", "image": "a:2", "env": [{"name": "Y", "value": "2"}]}
            ], "args": ["y"]}}),
        )
        .unwrap();
        assert_eq!(
            v,
            json!({"spec": {"containers": [
                {"name": "app", "image": "a:2", "env": [
                    {"name": "X", "value": "1"}, {"name": "Y", "value": "2"}
                ]},
                {"name": "side", "image": "s:1"}
            ], "args": ["y"]}})
        );
        let err = strategic_merge_patch(&mut v, &json!({"$patch": "replace"})).unwrap_err();
        assert_eq!(err.code, 400);
    }

    #[test]
    fn json_patch_applies_the_six_operations() {
        let mut v = json!({"a": [1, 2], "b": {"c": 1}});
        json_patch(
            &mut v,
            &json!([
                {"op": "add", "path": "/a/-", "value": 3},
                {"op": "replace", "path": "/b/c", "value": 2},
                {"op": "copy", "from": "/b", "path": "/d"},
                {"op": "move", "from": "/d/c", "path": "/e"},
                {"op": "remove", "path": "/a/0"},
                {"op": "test", "path": "/e", "value": 2}
            ]),
        )
        .unwrap();
        assert_eq!(v, json!({"a": [2, 3], "b": {"c": 2}, "d": {}, "e": 2}));
        let err = json_patch(&mut v, &json!([{"op": "test", "path": "/e", "value": 9}]));
        assert_eq!(err.unwrap_err().code, 422);
        let err = json_patch(&mut v, &json!([{"op": "remove", "path": "/nope"}]));
        assert_eq!(err.unwrap_err().code, 422);
    }
}
