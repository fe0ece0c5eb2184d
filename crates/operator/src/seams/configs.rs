//! Reading the ConfigMaps and Secrets a pod template references, and writing their `-primary`
//! copies ([`crate::configs`] decides which and what). Errors name the object, never its data.

use k8s_openapi::api::core::v1::{ConfigMap, PodTemplateSpec, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, Patch, PatchParams};

use crate::configs::{references, ConfigKind, ConfigObject, TrackedConfigs};
use crate::seams::workloads::{fault, FIELD_MANAGER};
use coalmine_rollout::TrafficFault;

/// The ConfigMaps and Secrets of one namespace.
#[derive(Clone)]
pub struct ConfigTracker {
    config_maps: Api<ConfigMap>,
    secrets: Api<Secret>,
}

impl ConfigTracker {
    pub fn new(client: kube::Client, namespace: &str) -> ConfigTracker {
        ConfigTracker {
            config_maps: Api::namespaced(client.clone(), namespace),
            secrets: Api::namespaced(client, namespace),
        }
    }

    /// The tracked configs `template` reads. A required one missing holds (`Unreachable`,
    /// naming it): the pods could not start without it, and it may yet be created.
    pub async fn read(&self, template: &PodTemplateSpec) -> Result<TrackedConfigs, TrafficFault> {
        let mut found = Vec::new();
        for (reference, need) in references(template) {
            let object = match reference.kind {
                ConfigKind::ConfigMap => self
                    .config_maps
                    .get_opt(&reference.name)
                    .await
                    .map(|o| o.map(ConfigObject::ConfigMap)),
                ConfigKind::Secret => self
                    .secrets
                    .get_opt(&reference.name)
                    .await
                    .map(|o| o.map(ConfigObject::Secret)),
            }
            .map_err(|e| fault(&reference.to_string(), e))?;
            found.push((reference, need, object));
        }
        TrackedConfigs::from_found(found).map_err(|e| TrafficFault::Unreachable(e.to_string()))
    }

    /// Writes each tracked object's `-primary` copy (server-side apply: a key removed from the
    /// original goes from the copy too).
    pub async fn copy_to_primary(
        &self,
        tracked: &TrackedConfigs,
        owner: &OwnerReference,
    ) -> Result<(), TrafficFault> {
        let params = PatchParams::apply(FIELD_MANAGER).force();
        for object in tracked.objects() {
            let copy = object.primary_copy(owner);
            let name = copy.reference().name;
            let written = match &copy {
                ConfigObject::ConfigMap(cm) => {
                    let mut body = serde_json::to_value(cm).expect("a ConfigMap serializes");
                    body["apiVersion"] = "v1".into();
                    body["kind"] = "ConfigMap".into();
                    self.config_maps
                        .patch(&name, &params, &Patch::Apply(&body))
                        .await
                        .map(|_| ())
                }
                ConfigObject::Secret(secret) => {
                    let mut body = serde_json::to_value(secret).expect("a Secret serializes");
                    body["apiVersion"] = "v1".into();
                    body["kind"] = "Secret".into();
                    self.secrets
                        .patch(&name, &params, &Patch::Apply(&body))
                        .await
                        .map(|_| ())
                }
            };
            written.map_err(|e| fault(&format!("writing {}", copy.reference()), e))?;
        }
        Ok(())
    }
}
