//! Field management: `metadata.managedFields` (`FieldsV1`) for every write, and server-side
//! apply (`application/apply-patch+yaml`) with its conflicts between managers.
//!
//! Follows the documented semantics (https://kubernetes.io/docs/reference/using-api/server-side-apply/):
//! an apply makes its manager own exactly the fields of its configuration; a field it set with
//! a value another manager owns with a different value is a conflict (409) unless `force=true`,
//! which takes the field over; two managers setting the same value share it; a field dropped
//! from a manager's configuration is removed from the object unless another manager owns it.
//! A non-apply write (`Update`) makes its manager own the fields it changed, taking them from
//! the others. Lists of objects are associative (merged item by item, items named `k:{..}`)
//! where the CRD says `x-kubernetes-list-type: map` or, for built-ins, where
//! [`crate::patch::merge_key`] knows the key; every other list is atomic (`set` lists included:
//! a known gap). `v:` (set item) entries are therefore never produced.

use std::collections::BTreeSet;

use serde_json::{json, Map, Value};

/// One field path as `FieldsV1` spells it: `f:spec`, `k:{"name":"app"}`, `.` (the item itself).
type Path = Vec<String>;

/// Which lists are associative, by the field names leading to them (`[]` steps into items).
pub type ListKeys<'a> = &'a dyn Fn(&[String], &[&Value]) -> Option<Vec<String>>;

#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub manager: String,
    /// `Apply` or `Update`.
    pub operation: String,
    pub api_version: String,
    pub time: String,
    pub subresource: String,
    pub fields: BTreeSet<Path>,
}

impl Entry {
    fn to_json(&self) -> Value {
        let mut entry = json!({
            "manager": self.manager,
            "operation": self.operation,
            "apiVersion": self.api_version,
            "time": self.time,
            "fieldsType": "FieldsV1",
            "fieldsV1": to_fields_v1(&self.fields),
        });
        if !self.subresource.is_empty() {
            entry["subresource"] = self.subresource.clone().into();
        }
        entry
    }

    fn from_json(value: &Value) -> Option<Self> {
        let mut fields = BTreeSet::new();
        from_fields_v1(value.get("fieldsV1")?, &mut Vec::new(), &mut fields);
        Some(Self {
            manager: value["manager"].as_str().unwrap_or_default().to_owned(),
            operation: value["operation"].as_str().unwrap_or("Update").to_owned(),
            api_version: value["apiVersion"].as_str().unwrap_or_default().to_owned(),
            time: value["time"].as_str().unwrap_or_default().to_owned(),
            subresource: value["subresource"].as_str().unwrap_or_default().to_owned(),
            fields,
        })
    }
}

pub fn read_entries(object: &Value) -> Vec<Entry> {
    object["metadata"]["managedFields"]
        .as_array()
        .map(|entries| entries.iter().filter_map(Entry::from_json).collect())
        .unwrap_or_default()
}

pub fn write_entries(object: &mut Value, entries: &[Entry]) {
    let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    let entries: Vec<Value> = entries
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(Entry::to_json)
        .collect();
    if entries.is_empty() {
        metadata.remove("managedFields");
    } else {
        metadata.insert("managedFields".into(), Value::Array(entries));
    }
}

fn to_fields_v1(fields: &BTreeSet<Path>) -> Value {
    let mut root = Map::new();
    for path in fields {
        let mut at = &mut root;
        for step in path {
            at = at
                .entry(step.clone())
                .or_insert_with(|| Value::Object(Map::new()))
                .as_object_mut()
                .expect("only objects are inserted");
        }
    }
    Value::Object(root)
}

fn from_fields_v1(value: &Value, prefix: &mut Path, out: &mut BTreeSet<Path>) {
    let Some(map) = value.as_object() else {
        return;
    };
    if map.is_empty() && !prefix.is_empty() {
        out.insert(prefix.clone());
    }
    for (step, sub) in map {
        prefix.push(step.clone());
        from_fields_v1(sub, prefix, out);
        prefix.pop();
    }
}

/// What field management tracks of an object: not its identity or the server's bookkeeping.
/// `part` picks the main resource (without `status`, when `status` is a subresource) or the
/// `status` subresource.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Whole,
    MainWithoutStatus,
    Status,
}

fn tracked(object: &Value, part: Part) -> Value {
    let mut tracked = Map::new();
    let Some(fields) = object.as_object() else {
        return Value::Object(tracked);
    };
    for (name, value) in fields {
        let keep = match part {
            Part::Status => name == "status",
            Part::MainWithoutStatus => name != "status",
            Part::Whole => true,
        };
        if !keep || matches!(name.as_str(), "apiVersion" | "kind") {
            continue;
        }
        if name == "metadata" {
            let mut metadata = Map::new();
            for key in ["labels", "annotations", "finalizers", "ownerReferences"] {
                if let Some(v) = value.get(key) {
                    metadata.insert(key.into(), v.clone());
                }
            }
            if !metadata.is_empty() {
                tracked.insert(name.clone(), Value::Object(metadata));
            }
        } else {
            tracked.insert(name.clone(), value.clone());
        }
    }
    Value::Object(tracked)
}

/// The field set of a value: every scalar, atomic list and empty object is a leaf; each item of
/// an associative list is `k:{...}` with `.` for the item itself.
fn field_set(value: &Value, keys: ListKeys) -> BTreeSet<Path> {
    let mut out = BTreeSet::new();
    collect(value, &mut Vec::new(), &mut Vec::new(), keys, &mut out);
    out
}

fn collect(
    value: &Value,
    names: &mut Vec<String>,
    prefix: &mut Path,
    keys: ListKeys,
    out: &mut BTreeSet<Path>,
) {
    let Some(map) = value.as_object() else {
        return;
    };
    for (name, sub) in map {
        prefix.push(format!("f:{name}"));
        names.push(name.clone());
        match sub {
            Value::Object(inner) if !inner.is_empty() => collect(sub, names, prefix, keys, out),
            Value::Array(items) => match associative(names, items, keys) {
                Some(key_names) => {
                    names.push("[]".into());
                    for item in items {
                        prefix.push(item_step(item, &key_names));
                        let mut itself = prefix.clone();
                        itself.push(".".into());
                        out.insert(itself);
                        collect(item, names, prefix, keys, out);
                        prefix.pop();
                    }
                    names.pop();
                }
                None => {
                    out.insert(prefix.clone());
                }
            },
            _ => {
                out.insert(prefix.clone());
            }
        }
        names.pop();
        prefix.pop();
    }
}

fn associative(names: &[String], items: &[Value], keys: ListKeys) -> Option<Vec<String>> {
    if items.is_empty() || !items.iter().all(Value::is_object) {
        return None;
    }
    let refs: Vec<&Value> = items.iter().collect();
    keys(names, &refs).filter(|k| !k.is_empty())
}

/// `k:{"name":"app"}`: the item's key fields, in key order.
fn item_step(item: &Value, key_names: &[String]) -> String {
    let mut key = Map::new();
    for k in key_names {
        key.insert(k.clone(), item.get(k).cloned().unwrap_or(Value::Null));
    }
    format!("k:{}", Value::Object(key))
}

fn item_matches(item: &Value, step: &str) -> bool {
    let Some(Ok(Value::Object(key))) = step.strip_prefix("k:").map(serde_json::from_str::<Value>)
    else {
        return false;
    };
    key.iter().all(|(k, v)| item.get(k) == Some(v))
}

fn value_at<'a>(value: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut at = value;
    for step in path {
        at = if let Some(name) = step.strip_prefix("f:") {
            at.get(name)?
        } else if step.starts_with("k:") {
            at.as_array()?.iter().find(|i| item_matches(i, step))?
        } else {
            at
        };
    }
    Some(at)
}

fn remove_at(value: &mut Value, path: &[String]) {
    let (last, parent_path) = match path {
        [parent @ .., item, dot] if dot == "." && item.starts_with("k:") => {
            let Some(list) = walk_mut(value, parent).and_then(Value::as_array_mut) else {
                return;
            };
            list.retain(|i| !item_matches(i, item));
            return;
        }
        [parent @ .., last] => (last, parent),
        [] => return,
    };
    if let (Some(name), Some(Value::Object(map))) =
        (last.strip_prefix("f:"), walk_mut(value, parent_path))
    {
        map.remove(name);
    }
}

fn walk_mut<'a>(value: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    let mut at = value;
    for step in path {
        at = if let Some(name) = step.strip_prefix("f:") {
            at.get_mut(name)?
        } else if step.starts_with("k:") {
            at.as_array_mut()?
                .iter_mut()
                .find(|i| item_matches(i, step))?
        } else {
            at
        };
    }
    Some(at)
}

/// `.spec.containers[name="app"].image`, as apply conflicts name a field.
pub fn display_path(path: &[String]) -> String {
    let mut out = String::new();
    for step in path {
        if let Some(name) = step.strip_prefix("f:") {
            out.push('.');
            out.push_str(name);
        } else if let Some(Ok(Value::Object(key))) =
            step.strip_prefix("k:").map(serde_json::from_str::<Value>)
        {
            let parts: Vec<String> = key.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out.push_str(&format!("[{}]", parts.join(",")));
        }
    }
    out
}

/// Records a non-apply write of `new` over `old` by `manager`: it owns what it changed.
pub fn record_update(
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    api_version: &str,
    part: Part,
    keys: ListKeys,
    now: &str,
) {
    let mut entries = old.map(read_entries).unwrap_or_default();
    let old_tracked = old.map(|o| tracked(o, part)).unwrap_or(json!({}));
    let new_tracked = tracked(new, part);
    let old_set = field_set(&old_tracked, keys);
    let new_set = field_set(&new_tracked, keys);
    let changed: BTreeSet<Path> = new_set
        .iter()
        .filter(|p| value_at(&old_tracked, p) != value_at(&new_tracked, p))
        .cloned()
        .collect();
    let removed: BTreeSet<Path> = old_set.difference(&new_set).cloned().collect();
    let subresource = if part == Part::Status { "status" } else { "" };
    for entry in &mut entries {
        entry
            .fields
            .retain(|p| !changed.contains(p) && !removed.contains(p));
    }
    if !changed.is_empty() {
        let at = entries.iter().position(|e| {
            e.manager == manager && e.operation == "Update" && e.subresource == subresource
        });
        let entry = match at {
            Some(at) => &mut entries[at],
            None => {
                entries.push(Entry {
                    manager: manager.to_owned(),
                    operation: "Update".into(),
                    api_version: api_version.to_owned(),
                    time: String::new(),
                    subresource: subresource.to_owned(),
                    fields: BTreeSet::new(),
                });
                entries.last_mut().expect("just pushed")
            }
        };
        entry.fields.extend(changed);
        entry.time = now.to_owned();
        entry.api_version = api_version.to_owned();
    }
    write_entries(new, &entries);
}

/// An apply refused because other managers own some of its fields with other values.
#[derive(Debug, Clone, PartialEq)]
pub struct Conflicts(pub Vec<(String, String)>);

/// Server-side apply of `config` by `manager` onto `live` (empty when the object is new);
/// the result carries the new `managedFields`.
#[allow(clippy::too_many_arguments)]
pub fn apply(
    live: Option<&Value>,
    config: &Value,
    manager: &str,
    force: bool,
    api_version: &str,
    part: Part,
    keys: ListKeys,
    now: &str,
) -> Result<Value, Conflicts> {
    let mut entries = live.map(read_entries).unwrap_or_default();
    let mut object = live.cloned().unwrap_or_else(|| json!({}));
    let config_tracked = tracked(config, part);
    let applied = field_set(&config_tracked, keys);
    let subresource = if part == Part::Status { "status" } else { "" };
    let is_mine =
        |e: &Entry| e.manager == manager && e.operation == "Apply" && e.subresource == subresource;

    let mut conflicts = Vec::new();
    for entry in entries.iter_mut().filter(|e| !is_mine(e)) {
        let clashing: Vec<Path> = entry
            .fields
            .intersection(&applied)
            .filter(|p| p.last().is_none_or(|s| s != "."))
            .filter(|p| {
                let current = value_at(&object, p);
                current.is_some() && current != value_at(&config_tracked, p)
            })
            .cloned()
            .collect();
        if force {
            entry.fields.retain(|p| !clashing.contains(p));
        } else {
            conflicts.extend(
                clashing
                    .iter()
                    .map(|p| (entry.manager.clone(), display_path(p))),
            );
        }
    }
    if !conflicts.is_empty() {
        return Err(Conflicts(conflicts));
    }

    // What this manager applied before and no longer does goes, unless someone else owns it.
    let before: BTreeSet<Path> = entries
        .iter()
        .filter(|e| is_mine(e))
        .flat_map(|e| e.fields.iter().cloned())
        .collect();
    let others: BTreeSet<Path> = entries
        .iter()
        .filter(|e| !is_mine(e))
        .flat_map(|e| e.fields.iter().cloned())
        .collect();
    let mut dropped: Vec<&Path> = before
        .iter()
        .filter(|p| !applied.contains(*p) && !others.contains(*p))
        .collect();
    dropped.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for path in dropped {
        remove_at(&mut object, path);
    }

    merge(&mut object, &config_tracked, &mut Vec::new(), keys);
    for field in ["apiVersion", "kind"] {
        if let Some(v) = config.get(field) {
            object[field] = v.clone();
        }
    }
    for field in ["name", "namespace", "generateName"] {
        if let Some(v) = config["metadata"].get(field) {
            object["metadata"][field] = v.clone();
        }
    }

    entries.retain(|e| !is_mine(e));
    entries.push(Entry {
        manager: manager.to_owned(),
        operation: "Apply".into(),
        api_version: api_version.to_owned(),
        time: now.to_owned(),
        subresource: subresource.to_owned(),
        fields: applied,
    });
    write_entries(&mut object, &entries);
    Ok(object)
}

/// Merges an applied configuration into the object: maps field by field, associative lists
/// item by item, everything else replaced; `null` removes.
fn merge(target: &mut Value, config: &Value, names: &mut Vec<String>, keys: ListKeys) {
    let (Some(target_map), Some(config_map)) = (target.as_object_mut(), config.as_object()) else {
        *target = config.clone();
        return;
    };
    for (name, value) in config_map {
        names.push(name.clone());
        match (target_map.get_mut(name), value) {
            (_, Value::Null) => {
                target_map.remove(name);
            }
            (Some(current @ Value::Object(_)), Value::Object(_)) => {
                merge(current, value, names, keys);
            }
            (Some(Value::Array(current)), Value::Array(items)) => {
                match associative(names, items, keys) {
                    Some(key_names) => {
                        names.push("[]".into());
                        for item in items {
                            let step = item_step(item, &key_names);
                            match current.iter_mut().find(|c| item_matches(c, &step)) {
                                Some(existing) => merge(existing, item, names, keys),
                                None => current.push(item.clone()),
                            }
                        }
                        names.pop();
                    }
                    None => *current = items.clone(),
                }
            }
            _ => {
                target_map.insert(name.clone(), value.clone());
            }
        }
        names.pop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn containers_by_name(names: &[String], items: &[&Value]) -> Option<Vec<String>> {
        let field = names.last()?;
        crate::patch::merge_key(field, items).map(|k| vec![k.to_owned()])
    }

    fn apply_as(
        live: Option<&Value>,
        config: Value,
        manager: &str,
        force: bool,
    ) -> Result<Value, Conflicts> {
        apply(
            live,
            &config,
            manager,
            force,
            "v1",
            Part::Whole,
            &containers_by_name,
            "2025-01-01T00:00:00Z",
        )
    }

    #[test]
    fn fields_v1_round_trips_with_items_keyed_by_name() {
        let object =
            json!({"spec": {"replicas": 2, "containers": [{"name": "app", "image": "a"}]}});
        let set = field_set(&object, &containers_by_name);
        let v1 = to_fields_v1(&set);
        assert_eq!(
            v1,
            json!({"f:spec": {"f:replicas": {}, "f:containers": {
                "k:{\"name\":\"app\"}": {".": {}, "f:image": {}, "f:name": {}}
            }}})
        );
        let mut back = BTreeSet::new();
        from_fields_v1(&v1, &mut Vec::new(), &mut back);
        assert_eq!(back, set);
    }

    #[test]
    fn two_appliers_conflict_share_and_drop_fields() {
        let a = apply_as(
            None,
            json!({"metadata": {"name": "x"}, "spec": {"replicas": 1, "paused": false}}),
            "a",
            false,
        )
        .unwrap();
        // Same value: shared, no conflict.
        let b = apply_as(
            Some(&a),
            json!({"metadata": {"name": "x"}, "spec": {"paused": false, "minReadySeconds": 5}}),
            "b",
            false,
        )
        .unwrap();
        // Another value: conflict with "a".
        let err = apply_as(
            Some(&b),
            json!({"metadata": {"name": "x"}, "spec": {"replicas": 3}}),
            "b",
            false,
        )
        .unwrap_err();
        assert_eq!(err.0, [("a".to_owned(), ".spec.replicas".to_owned())]);
        // "a" drops paused: "b" still owns it, so it stays; "a" drops replicas: it goes.
        let c = apply_as(
            Some(&b),
            json!({"metadata": {"name": "x"}, "spec": {}}),
            "a",
            false,
        )
        .unwrap();
        assert_eq!(c["spec"], json!({"paused": false, "minReadySeconds": 5}));
    }
}
