//! The ConfigMaps and Secrets a rollout's pods read, tracked as Flagger tracks them
//! (`pkg/canary/config_tracker.go`): a change of their data is a new revision (it is hashed into
//! the spec hash, so it starts an analysis like a new image), and the primary runs on copies
//! named `<name>-primary`, refreshed only at promotion, so the canary (the target, which keeps
//! the originals) is the only one that sees an edit until it has been analysed.
//!
//! - Found in the pod template's volumes (`configMap`, `secret`, `projected` sources) and in
//!   `envFrom` and `env[].valueFrom` of its containers and init containers.
//! - Not tracked: an object annotated `flagger.app/config-tracking: disabled`, and Secrets of
//!   types other than Opaque, basic-auth, ssh-auth and tls (registry credentials and
//!   service-account tokens belong to the cluster, not to a revision), as Flagger.
//! - Missing: skipped when every reference to it says `optional: true`; otherwise the pods
//!   could not start, and the rollout holds until it exists.
//!
//! Pure: the objects read are given; reading and writing them is `seams::configs`. A Secret's
//! data never appears in an error, a log line, `Debug` output or the status: only its name and
//! a hash.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, PodTemplateSpec, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use crate::workload::primary_name;

/// The annotation that turns tracking off for one ConfigMap or Secret (Flagger's; any value
/// starting with `disable`).
pub const TRACKING_ANNOTATION: &str = "flagger.app/config-tracking";

/// The Secret types Flagger tracks (`""` is Opaque: the API server's default).
const TRACKED_SECRET_TYPES: [&str; 5] = [
    "",
    "Opaque",
    "kubernetes.io/basic-auth",
    "kubernetes.io/ssh-auth",
    "kubernetes.io/tls",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ConfigKind {
    ConfigMap,
    Secret,
}

impl ConfigKind {
    /// As Kubernetes names the kind.
    pub fn kind(self) -> &'static str {
        match self {
            ConfigKind::ConfigMap => "ConfigMap",
            ConfigKind::Secret => "Secret",
        }
    }

    /// As Flagger's `status.trackedConfigs` keys name it.
    fn key_prefix(self) -> &'static str {
        match self {
            ConfigKind::ConfigMap => "configmap",
            ConfigKind::Secret => "secret",
        }
    }
}

/// One ConfigMap or Secret, by kind and name (in the rollout's namespace).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConfigRef {
    pub kind: ConfigKind,
    pub name: String,
}

impl ConfigRef {
    pub fn config_map(name: &str) -> ConfigRef {
        ConfigRef {
            kind: ConfigKind::ConfigMap,
            name: name.to_string(),
        }
    }

    pub fn secret(name: &str) -> ConfigRef {
        ConfigRef {
            kind: ConfigKind::Secret,
            name: name.to_string(),
        }
    }

    /// Its key in `status.trackedConfigs`: `configmap/<name>` or `secret/<name>`, as Flagger
    /// writes them (so a Canary's status reads the same under either).
    pub fn key(&self) -> String {
        format!("{}/{}", self.kind.key_prefix(), self.name)
    }
}

impl fmt::Display for ConfigRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind.kind(), self.name)
    }
}

/// Whether the pods need a referenced object: required unless every reference to it is
/// `optional: true` (Kubernetes' default is required).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Required,
    Optional,
}

impl Need {
    fn of(optional: Option<bool>) -> Need {
        if optional == Some(true) {
            Need::Optional
        } else {
            Need::Required
        }
    }
}

/// Every ConfigMap and Secret `template` references, and whether its pods need it.
pub fn references(template: &PodTemplateSpec) -> BTreeMap<ConfigRef, Need> {
    let mut found = BTreeMap::new();
    let mut note = |reference: ConfigRef, optional: Option<bool>| {
        let need = found.entry(reference).or_insert(Need::Optional);
        if Need::of(optional) == Need::Required {
            *need = Need::Required;
        }
    };
    let Some(pod) = template.spec.as_ref() else {
        return found;
    };
    for volume in pod.volumes.iter().flatten() {
        if let Some(cm) = &volume.config_map {
            note(ConfigRef::config_map(&cm.name), cm.optional);
        }
        if let Some(secret) = &volume.secret {
            if let Some(name) = &secret.secret_name {
                note(ConfigRef::secret(name), secret.optional);
            }
        }
        for source in volume
            .projected
            .iter()
            .flat_map(|p| p.sources.iter().flatten())
        {
            if let Some(cm) = &source.config_map {
                note(ConfigRef::config_map(&cm.name), cm.optional);
            }
            if let Some(secret) = &source.secret {
                note(ConfigRef::secret(&secret.name), secret.optional);
            }
        }
    }
    for container in containers(pod) {
        for from in container.env_from.iter().flatten() {
            if let Some(cm) = &from.config_map_ref {
                note(ConfigRef::config_map(&cm.name), cm.optional);
            }
            if let Some(secret) = &from.secret_ref {
                note(ConfigRef::secret(&secret.name), secret.optional);
            }
        }
        for value_from in container
            .env
            .iter()
            .flatten()
            .filter_map(|e| e.value_from.as_ref())
        {
            if let Some(key) = &value_from.config_map_key_ref {
                note(ConfigRef::config_map(&key.name), key.optional);
            }
            if let Some(key) = &value_from.secret_key_ref {
                note(ConfigRef::secret(&key.name), key.optional);
            }
        }
    }
    found
}

fn containers(pod: &PodSpec) -> impl Iterator<Item = &Container> {
    pod.containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
}

fn containers_mut(pod: &mut PodSpec) -> impl Iterator<Item = &mut Container> {
    pod.containers
        .iter_mut()
        .chain(pod.init_containers.iter_mut().flatten())
}

/// The template for the primary: each reference to a tracked object names its `-primary` copy
/// instead (volumes, projected sources, `envFrom`, `env[].valueFrom`, in containers and init
/// containers). Untracked references are left as they are.
pub fn point_at_primary_copies(template: &mut PodTemplateSpec, tracked: &BTreeSet<ConfigRef>) {
    let Some(pod) = template.spec.as_mut() else {
        return;
    };
    let rename = |kind: ConfigKind, name: &mut String| {
        let reference = ConfigRef {
            kind,
            name: name.clone(),
        };
        if tracked.contains(&reference) {
            *name = primary_name(name);
        }
    };
    for volume in pod.volumes.iter_mut().flatten() {
        if let Some(cm) = volume.config_map.as_mut() {
            rename(ConfigKind::ConfigMap, &mut cm.name);
        }
        if let Some(name) = volume.secret.as_mut().and_then(|s| s.secret_name.as_mut()) {
            rename(ConfigKind::Secret, name);
        }
        for source in volume
            .projected
            .iter_mut()
            .flat_map(|p| p.sources.iter_mut().flatten())
        {
            if let Some(cm) = source.config_map.as_mut() {
                rename(ConfigKind::ConfigMap, &mut cm.name);
            }
            if let Some(secret) = source.secret.as_mut() {
                rename(ConfigKind::Secret, &mut secret.name);
            }
        }
    }
    for container in containers_mut(pod) {
        for from in container.env_from.iter_mut().flatten() {
            if let Some(cm) = from.config_map_ref.as_mut() {
                rename(ConfigKind::ConfigMap, &mut cm.name);
            }
            if let Some(secret) = from.secret_ref.as_mut() {
                rename(ConfigKind::Secret, &mut secret.name);
            }
        }
        for value_from in container
            .env
            .iter_mut()
            .flatten()
            .filter_map(|e| e.value_from.as_mut())
        {
            if let Some(key) = value_from.config_map_key_ref.as_mut() {
                rename(ConfigKind::ConfigMap, &mut key.name);
            }
            if let Some(key) = value_from.secret_key_ref.as_mut() {
                rename(ConfigKind::Secret, &mut key.name);
            }
        }
    }
}

/// A referenced object as read from the API server.
#[derive(Clone, PartialEq)]
pub enum ConfigObject {
    ConfigMap(ConfigMap),
    Secret(Secret),
}

impl ConfigObject {
    fn meta(&self) -> &ObjectMeta {
        match self {
            ConfigObject::ConfigMap(cm) => &cm.metadata,
            ConfigObject::Secret(s) => &s.metadata,
        }
    }

    pub fn reference(&self) -> ConfigRef {
        let name = self.meta().name.clone().unwrap_or_default();
        match self {
            ConfigObject::ConfigMap(_) => ConfigRef::config_map(&name),
            ConfigObject::Secret(_) => ConfigRef::secret(&name),
        }
    }

    /// Whether its changes make a revision: not switched off by annotation, and not a Secret
    /// of a type that belongs to the cluster (registry credentials, service-account tokens).
    pub fn is_tracked(&self) -> bool {
        let disabled = self
            .meta()
            .annotations
            .as_ref()
            .and_then(|a| a.get(TRACKING_ANNOTATION))
            .is_some_and(|v| v.starts_with("disable"));
        let tracked_type = match self {
            ConfigObject::ConfigMap(_) => true,
            ConfigObject::Secret(s) => {
                TRACKED_SECRET_TYPES.contains(&s.type_.as_deref().unwrap_or_default())
            }
        };
        !disabled && tracked_type
    }

    /// A short, stable digest of its kind, name and data (what `status.trackedConfigs`
    /// shows): a Secret's data is never shown, only this.
    pub fn hash(&self) -> String {
        let data = match self {
            ConfigObject::ConfigMap(cm) => serde_json::json!([cm.data, cm.binary_data]),
            ConfigObject::Secret(s) => serde_json::json!([s.data]),
        };
        // serde_json's maps are sorted, so equal data serializes equally.
        let text =
            serde_json::to_string(&(self.reference().key(), data)).expect("config data serializes");
        format!("{:016x}", xxhash_rust::xxh3::xxh3_64(text.as_bytes()))
    }

    /// `<name>-primary`: its data (and a Secret's type), owned like the primary Deployment.
    /// Not `immutable` even if the original is: the copy is refreshed at each promotion.
    pub fn primary_copy(&self, owner: &OwnerReference) -> ConfigObject {
        let metadata = ObjectMeta {
            name: Some(primary_name(
                self.meta().name.as_deref().unwrap_or_default(),
            )),
            namespace: self.meta().namespace.clone(),
            owner_references: Some(vec![owner.clone()]),
            ..ObjectMeta::default()
        };
        match self {
            ConfigObject::ConfigMap(cm) => ConfigObject::ConfigMap(ConfigMap {
                metadata,
                data: cm.data.clone(),
                binary_data: cm.binary_data.clone(),
                immutable: None,
            }),
            ConfigObject::Secret(s) => ConfigObject::Secret(Secret {
                metadata,
                data: s.data.clone(),
                type_: s.type_.clone(),
                immutable: None,
                string_data: None,
            }),
        }
    }
}

/// Never the data: a Secret's would end up in logs.
impl fmt::Debug for ConfigObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.reference(), self.hash())
    }
}

/// Why the tracked configs cannot be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{reference}, which the pod template references (not optional), does not exist")]
    Missing { reference: ConfigRef },
}

/// The tracked ConfigMaps and Secrets of one pod template, as read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrackedConfigs {
    objects: Vec<ConfigObject>,
}

impl TrackedConfigs {
    /// From what each reference found (`None`: not there): the tracked ones, or the first
    /// required object missing.
    pub fn from_found(
        found: impl IntoIterator<Item = (ConfigRef, Need, Option<ConfigObject>)>,
    ) -> Result<TrackedConfigs, ConfigError> {
        let mut objects = Vec::new();
        for (reference, need, object) in found {
            match object {
                Some(object) if object.is_tracked() => objects.push(object),
                Some(_) => {}
                None if need == Need::Optional => {}
                None => return Err(ConfigError::Missing { reference }),
            }
        }
        objects.sort_by_key(ConfigObject::reference);
        Ok(TrackedConfigs { objects })
    }

    pub fn objects(&self) -> &[ConfigObject] {
        &self.objects
    }

    /// What the primary's template points at.
    pub fn references(&self) -> BTreeSet<ConfigRef> {
        self.objects.iter().map(ConfigObject::reference).collect()
    }

    /// `status.trackedConfigs`, and what the spec hash includes: key → data hash.
    pub fn hashes(&self) -> BTreeMap<String, String> {
        self.objects
            .iter()
            .map(|o| (o.reference().key(), o.hash()))
            .collect()
    }
}
