//! Volumes (`[[volumes]]`, `shoal get volumes`, `shoal delete volume`): made by the apply that
//! first mounts one (`state.rs`), bound to a node by the scheduler when the first replica that
//! mounts it is placed (`shoal_scheduler::plan`), measured by that node, and deleted only by
//! hand once no app mounts it. Its node then removes its directory.

use crate::error::ControlError;
use crate::state::ControlPlane;
use shoal_api::{VolumeUsage, VolumeView};
use shoal_core::objects::keys;
use shoal_core::spec::VolumeMount;
use shoal_core::{App, Shrunk, Volume};
use std::collections::BTreeMap;

impl ControlPlane {
    /// Every volume of `ns` (of all namespaces if `None`).
    pub fn volumes(&self, ns: Option<&str>) -> Result<Vec<VolumeView>, ControlError> {
        let volumes: Vec<Volume> = match ns {
            Some(ns) => self.list(&keys::volumes_in(ns))?,
            None => self.list(&keys::VOLUMES)?,
        };
        let apps: Vec<App> = self.list(&keys::APPS)?;
        let used = self
            .inner
            .volume_usage
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        Ok(volumes
            .into_iter()
            .map(|v| VolumeView {
                used_by: users(&apps, &v.namespace, &v.name),
                used_bytes: used.get(&(v.namespace.clone(), v.name.clone())).copied(),
                size_bytes: v.size_bytes,
                node: v.node,
                created_at: v.created_at,
                namespace: v.namespace,
                name: v.name,
            })
            .collect())
    }

    /// Deletes volume `name` of `ns`, unless an app mounts it.
    pub fn delete_volume(&self, ns: &str, name: &str) -> Result<(), ControlError> {
        let key = keys::volume(ns, name);
        let Some((_, at)) = self.get::<Volume>(&key)? else {
            return Err(ControlError::not_found(format!(
                "volume {name} does not exist in namespace {ns}"
            )));
        };
        let apps: Vec<App> = self.list(&keys::apps_in(ns))?;
        let users = users(&apps, ns, name);
        if !users.is_empty() {
            return Err(ControlError::conflict(format!(
                "volume {name} is mounted by {}: take it out of their specs first",
                users.join(", ")
            )));
        }
        // Its node removes the data once it no longer hears of it (`Link::volumes`).
        self.delete_as_read(
            key.to_string(),
            at,
            &format!("volume {name}"),
            "VolumeDeleted",
            format!("volume/{ns}/{name}"),
        )
    }

    /// `volume` as a spec's `mount` leaves it ([`Volume::sized`]), judged on what its node
    /// last measured it holding.
    pub(crate) fn sized(
        &self,
        namespace: &str,
        mount: &VolumeMount,
        volume: Volume,
    ) -> Result<Volume, Shrunk> {
        let used = self
            .inner
            .volume_usage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(namespace.to_string(), mount.name.clone()))
            .copied();
        volume.sized(mount, used)
    }

    /// [`Self::sized`] for an apply: a size below what the volume holds is a conflict.
    pub(crate) fn applied_size(
        &self,
        namespace: &str,
        mount: &VolumeMount,
        volume: Volume,
    ) -> Result<Volume, ControlError> {
        self.sized(namespace, mount, volume).map_err(|shrunk| {
            ControlError::conflict(format!("{}; give at least that", shrunk.say(&mount.name)))
        })
    }

    /// What the nodes last measured each volume holding, by namespace and name.
    pub(crate) fn volume_usage(&self) -> BTreeMap<(String, String), u64> {
        self.inner
            .volume_usage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// Notes what `node` measured its volumes holding; answers the volumes bound to it.
    pub fn record_volume_usage(
        &self,
        node: &str,
        usage: Vec<VolumeUsage>,
    ) -> Result<Vec<VolumeUsage>, ControlError> {
        let bound: Vec<Volume> = self
            .list::<Volume>(&keys::VOLUMES)?
            .into_iter()
            .filter(|v| v.node.as_deref() == Some(node))
            .collect();
        let mut used = self
            .inner
            .volume_usage
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for u in usage {
            if bound
                .iter()
                .any(|v| v.namespace == u.namespace && v.name == u.name)
            {
                used.insert((u.namespace, u.name), u.bytes);
            }
        }
        Ok(bound
            .into_iter()
            .map(|v| VolumeUsage {
                bytes: used
                    .get(&(v.namespace.clone(), v.name.clone()))
                    .copied()
                    .unwrap_or(0),
                namespace: v.namespace,
                name: v.name,
            })
            .collect())
    }
}

/// The apps of `apps` in `ns` that mount volume `name`.
fn users(apps: &[App], ns: &str, name: &str) -> Vec<String> {
    apps.iter()
        .filter(|a| a.spec.namespace == ns && a.spec.volumes.iter().any(|v| v.name == name))
        .map(|a| a.spec.name.clone())
        .collect()
}
