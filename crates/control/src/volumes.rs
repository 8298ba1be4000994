//! Volumes (`[[volumes]]`, `shoal get volumes`, `shoal delete volume`): made by the apply that
//! first mounts one (`state.rs`), bound to a node by the scheduler when the first replica that
//! mounts it is placed (`shoal_scheduler::plan`), measured by that node, and deleted only by
//! hand once no app mounts it. Its node then removes its directory, told so by a
//! [`VolumeDeletion`] record, never for want of hearing of the volume.

use crate::error::ControlError;
use crate::state::{ControlPlane, encode};
use shoal_api::{VolumeUsage, VolumeView};
use shoal_core::objects::keys;
use shoal_core::spec::VolumeMount;
use shoal_core::{App, Shrunk, Volume, VolumeDeletion};
use shoal_store::{Op, Txn};
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
        let Some((volume, at)) = self.get::<Volume>(&key)? else {
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
        // A node deleted for good took the data with it; no one would remove the record.
        let node = match volume.node {
            Some(node) if self.get(&keys::node(&node))?.is_some() => Some(node),
            _ => None,
        };
        let (also, message) = match node {
            // Its node removes the data when it next reports its volumes (`Link::volumes`).
            Some(node) => {
                let deletion = VolumeDeletion {
                    namespace: ns.to_string(),
                    name: name.to_string(),
                    node: node.clone(),
                    deleted_at: self.now(),
                };
                let put = Op::put(
                    keys::volume_deletion(ns, name).to_string(),
                    encode(&deletion),
                );
                let message = format!("volume {name} deleted; node {node} removes its data");
                (vec![put], message)
            }
            None => (Vec::new(), format!("volume {name} deleted")),
        };
        self.delete_as_read_with(
            key.to_string(),
            at,
            &format!("volume {name}"),
            "VolumeDeleted",
            format!("volume/{ns}/{name}"),
            also,
            message,
        )
    }

    /// Refuses to make volume `name` of `ns` again while its node has yet to remove the data
    /// of the one deleted: the new volume would start with it. With `wait`, waits a while
    /// first, as a node that runs reports within a few seconds (an apply right after a
    /// `delete volume` then goes through).
    pub(crate) fn may_make_volume(
        &self,
        ns: &str,
        name: &str,
        wait: bool,
    ) -> Result<(), ControlError> {
        let waited = std::time::Instant::now();
        loop {
            let Some((d, _)) = self.get::<VolumeDeletion>(&keys::volume_deletion(ns, name))? else {
                return Ok(());
            };
            if !wait || waited.elapsed() >= crate::state::DELETED_WAIT {
                return Err(ControlError::conflict(format!(
                    "volume {name} was deleted, and node {node} has not removed its data yet (it is down, or has not reported since): apply again once it has, or, if that node is gone for good, `shoal node delete {node}`",
                    node = d.node
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
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

    /// Notes what `node` measured its volumes holding; answers the volumes bound to it, and
    /// the deleted ones whose data it still holds (`deleted`). The record of a deletion goes
    /// once the node no longer reports the volume.
    pub fn record_volume_usage(
        &self,
        node: &str,
        usage: Vec<VolumeUsage>,
    ) -> Result<Vec<VolumeUsage>, ControlError> {
        let (deletions, _) = self.inner.store.range(keys::VOLUME_DELETIONS.as_str())?;
        let mut deleted = Vec::new();
        for kv in deletions {
            let d: VolumeDeletion = crate::state::decode(&kv)?;
            if d.node != node {
                continue;
            }
            if usage
                .iter()
                .any(|u| u.namespace == d.namespace && u.name == d.name)
            {
                deleted.push(VolumeUsage {
                    namespace: d.namespace,
                    name: d.name,
                    bytes: 0,
                    deleted: true,
                });
            } else {
                let gone = Txn::new()
                    .when_mod_revision(kv.key.clone(), kv.mod_revision)
                    .then(Op::delete(kv.key));
                self.inner.store.txn(gone)?;
            }
        }
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
                deleted: false,
            })
            .chain(deleted)
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
