//! Objects, the resource version counter and the change history that watches read.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde_json::Value;

use crate::resources::ResourceType;

/// How many changes are kept for watches to resume from; older ones are compacted away, as etcd
/// and the watch cache do (a watch from before them gets 410 Gone).
const HISTORY: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

#[derive(Debug, Clone)]
pub struct Change {
    pub rv: u64,
    pub group: String,
    pub plural: String,
    pub namespace: String,
    pub kind: ChangeKind,
    pub object: Value,
    /// The object before a modification: a watch with a selector turns a change that moves an
    /// object out of (into) the selection into DELETED (ADDED), as the API server does.
    pub old: Option<Value>,
}

/// `(group, plural, namespace, name)`; `namespace` is empty for cluster-scoped objects.
pub type Key = (String, String, String, String);

pub struct Store {
    pub types: Vec<Arc<ResourceType>>,
    pub objects: BTreeMap<Key, Value>,
    pub rv: u64,
    pub history: VecDeque<Change>,
    /// A watch or continue token from a resourceVersion below this is too old.
    pub oldest: u64,
    /// Bumped by [`crate::FakeApiServer::compact`]: open watches end with 410 Expired.
    pub epoch: u64,
}

pub fn key_of(rt: &ResourceType, namespace: &str, name: &str) -> Key {
    (
        rt.group.clone(),
        rt.plural.clone(),
        namespace.to_owned(),
        name.to_owned(),
    )
}

impl Store {
    pub fn new(types: Vec<Arc<ResourceType>>) -> Self {
        Self {
            types,
            objects: BTreeMap::new(),
            rv: 1,
            history: VecDeque::new(),
            oldest: 1,
            epoch: 0,
        }
    }

    pub fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    pub fn record(
        &mut self,
        rt: &ResourceType,
        kind: ChangeKind,
        object: Value,
        old: Option<Value>,
    ) {
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        self.history.push_back(Change {
            rv: self.rv,
            group: rt.group.clone(),
            plural: rt.plural.clone(),
            namespace,
            kind,
            object,
            old,
        });
        while self.history.len() > HISTORY {
            if let Some(dropped) = self.history.pop_front() {
                self.oldest = dropped.rv;
            }
        }
    }

    /// Forgets every change so far, as an etcd compaction does.
    pub fn compact(&mut self) {
        self.history.clear();
        self.oldest = self.rv;
        self.epoch += 1;
    }

    /// Objects of one resource, in `(namespace, name)` order.
    pub fn list<'a>(
        &'a self,
        rt: &ResourceType,
        namespace: Option<&'a str>,
    ) -> impl Iterator<Item = (&'a Key, &'a Value)> + 'a {
        let (group, plural) = (rt.group.clone(), rt.plural.clone());
        self.objects.iter().filter(move |((g, p, ns, _), _)| {
            *g == group && *p == plural && namespace.is_none_or(|n| n == ns)
        })
    }

    pub fn find_type(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceType>> {
        self.types
            .iter()
            .find(|t| {
                t.group == group && t.plural == plural && t.versions.iter().any(|v| v == version)
            })
            .cloned()
    }
}
