//! Modules nobody uses go: `shoal delete module`, and the controller's
//! collection of modules no revision uses (revision history included) and
//! nothing uploaded or applied for a grace period.
//!
//! Neither can delete a module from under a revision made meanwhile: an apply
//! that makes a revision writes the module's [`ModuleUse`] in the same
//! transaction (guarded on the module still being there), and a deletion is
//! guarded on the module and its use as read before the revisions were read.

use crate::error::ControlError;
use crate::state::ControlPlane;
use shoal_core::objects::keys;
use shoal_core::{EventType, Millis, Module, ModuleUse, Revision};
use shoal_store::{Op, Txn};
use std::collections::{BTreeMap, HashSet};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Digests being recorded, or having their record deleted and their file unlinked: an upload
/// of the same bytes in between would record a module whose file goes just after. One lock per
/// digest, held while that digest is busy: what other modules do never waits on it.
#[derive(Default)]
pub(crate) struct ModuleLocks {
    busy: Mutex<HashSet<String>>,
    freed: Condvar,
}

/// Holds `digest` until dropped.
pub(crate) struct ModuleLock<'a> {
    locks: &'a ModuleLocks,
    digest: String,
}

impl ModuleLocks {
    pub(crate) fn lock(&self, digest: &str) -> ModuleLock<'_> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        while busy.contains(digest) {
            busy = self.freed.wait(busy).unwrap_or_else(|p| p.into_inner());
        }
        busy.insert(digest.to_string());
        ModuleLock {
            locks: self,
            digest: digest.to_string(),
        }
    }
}

impl Drop for ModuleLock<'_> {
    fn drop(&mut self) {
        let locks = self.locks;
        (locks.busy.lock().unwrap_or_else(|p| p.into_inner())).remove(&self.digest);
        locks.freed.notify_all();
    }
}

/// The apps and revisions that use each module, as `app default/web revision 3`.
fn users(revisions: &[Revision]) -> BTreeMap<&str, Vec<String>> {
    let mut users: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for r in revisions {
        users
            .entry(r.template.component.digest.as_str())
            .or_default()
            .push(format!("app {} revision {}", r.app, r.number));
    }
    users
}

/// A module as a collection read it: the record and its last use, each with
/// the store revision it was read at (0: no use recorded).
#[derive(Debug, Clone)]
struct Read {
    module: Module,
    at: u64,
    last_used: Millis,
    use_at: u64,
}

/// The modules to collect: used by no revision, and idle (neither uploaded
/// nor applied) for at least `grace` by `now`.
fn unused<'m>(
    modules: &'m [Read],
    revisions: &[Revision],
    now: Millis,
    grace: Duration,
) -> Vec<&'m Read> {
    let used = users(revisions);
    let grace = grace.as_millis() as Millis;
    modules
        .iter()
        .filter(|m| !used.contains_key(m.module.digest.as_str()))
        .filter(|m| now.saturating_sub(m.module.uploaded_at.max(m.last_used)) >= grace)
        .collect()
}

impl ControlPlane {
    /// Every module with its last use, as they are now.
    fn modules_read(&self) -> Result<Vec<Read>, ControlError> {
        let (uses, _) = self.inner.store.range(keys::MODULE_USES.as_str())?;
        let mut uses: BTreeMap<String, (Millis, u64)> = uses
            .iter()
            .map(|kv| {
                let digest = kv.key[keys::MODULE_USES.as_str().len()..].to_string();
                let used: ModuleUse = crate::state::decode(kv)?;
                Ok((digest, (used.last_used, kv.mod_revision)))
            })
            .collect::<Result<_, ControlError>>()?;
        let (kvs, _) = self.inner.store.range(keys::MODULES.as_str())?;
        kvs.iter()
            .map(|kv| {
                let module: Module = crate::state::decode(kv)?;
                let (last_used, use_at) = uses.remove(&module.digest).unwrap_or((0, 0));
                Ok(Read {
                    module,
                    at: kv.mod_revision,
                    last_used,
                    use_at,
                })
            })
            .collect()
    }

    /// The module as it is now, for a deletion by request.
    fn module_read(&self, digest: &str) -> Result<Option<Read>, ControlError> {
        let Some((module, at)) = self.get::<Module>(&keys::module(digest))? else {
            return Ok(None);
        };
        let (last_used, use_at) = self
            .get::<ModuleUse>(&keys::module_use(digest))?
            .map_or((0, 0), |(u, at)| (u.last_used, at));
        Ok(Some(Read {
            module,
            at,
            last_used,
            use_at,
        }))
    }

    /// Deletes the module and its use if both are still as read, then its blob.
    fn delete_module_record(&self, read: &Read, why: &str) -> Result<bool, ControlError> {
        let module = &read.module;
        // Record and file go together, with no upload of the same bytes in between.
        let _deleting = self.inner.module_locks.lock(&module.digest);
        let key = keys::module(&module.digest);
        let use_key = keys::module_use(&module.digest);
        let txn = Txn::new().when_mod_revision(key.clone(), read.at);
        let txn = match read.use_at {
            0 => txn.when_absent(use_key.clone()),
            at => txn.when_mod_revision(use_key.clone(), at),
        };
        let mut txn = txn.then(Op::delete(key)).then(Op::delete(use_key));
        if self.inner.config.shared_store {
            txn = txn.then(Op::delete_prefix(crate::shared_modules::prefix(
                &module.digest,
            )));
        }
        let txn = txn.then(self.event_op(
            EventType::Normal,
            "ModuleDeleted",
            format!("module/{}", module.digest),
            None,
            format!("module {} deleted: {why}", module.digest),
        ));
        if !self.inner.store.txn(txn)?.succeeded {
            return Ok(false);
        }
        // The record goes first: a crash here leaves a blob no record names, which an
        // upload of the same bytes takes over.
        self.inner
            .blobs
            .delete(&module.digest)
            .map_err(ControlError::internal)?;
        Ok(true)
    }

    /// `shoal delete module`: refused while a revision uses the module.
    pub fn delete_module(&self, digest: &str) -> Result<(), ControlError> {
        // The module first, the revisions after: see the module doc.
        let Some(read) = self.module_read(digest)? else {
            return Err(ControlError::not_found(format!(
                "module {digest} has not been uploaded"
            )));
        };
        let revisions = self.list::<Revision>(&keys::REVISIONS)?;
        if let Some(users) = users(&revisions).get(digest) {
            return Err(ControlError::conflict(format!(
                "module {digest} is in use by {}; delete those apps first (revision history included)",
                users.join(", ")
            )));
        }
        if !self.delete_module_record(&read, "deleted by request")? {
            return Err(ControlError::conflict(format!(
                "module {digest} was applied meanwhile; it is in use"
            )));
        }
        Ok(())
    }

    /// Deletes the modules no revision uses that were idle for `grace`; returns how many.
    pub(crate) fn collect_modules(&self, grace: Duration) -> Result<usize, ControlError> {
        // Modules first, revisions after: see the module doc.
        let modules = self.modules_read()?;
        let revisions = self.list::<Revision>(&keys::REVISIONS)?;
        let mut collected = 0;
        for read in unused(&modules, &revisions, self.now(), grace) {
            let why = "no revision used it for the collection grace";
            if self.delete_module_record(read, why)? {
                collected += 1;
            }
        }
        Ok(collected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_core::wasm::WasmKind;

    fn module(hex: char, uploaded_at: Millis, last_used: Millis) -> Read {
        Read {
            module: Module {
                digest: format!("sha256:{}", hex.to_string().repeat(64)),
                size: 1,
                kind: WasmKind::Component,
                uploaded_at,
                oci: None,
                exports: None,
            },
            at: 1,
            last_used,
            use_at: 1,
        }
    }

    /// A module's upload or delete waits only on those of the same module.
    #[test]
    fn a_module_lock_holds_its_digest_alone() {
        let locks = std::sync::Arc::new(ModuleLocks::default());
        let held = locks.lock("sha256:a");
        let (tx, rx) = std::sync::mpsc::channel();
        let take = |digest: &'static str| {
            let (locks, tx) = (locks.clone(), tx.clone());
            std::thread::spawn(move || {
                let _held = locks.lock(digest);
                tx.send(digest).unwrap();
            })
        };
        let other = take("sha256:b");
        let wait = Duration::from_secs(10);
        assert_eq!(rx.recv_timeout(wait), Ok("sha256:b"));
        other.join().unwrap();
        let same = take("sha256:a");
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        drop(held);
        assert_eq!(rx.recv_timeout(wait), Ok("sha256:a"));
        same.join().unwrap();
    }

    #[test]
    fn only_modules_no_revision_uses_and_idle_for_the_grace_go() {
        let used = module('a', 0, 0);
        let fresh = module('b', 9_500, 0);
        let reapplied = module('c', 0, 9_500);
        let idle = module('d', 0, 1_000);
        let spec = shoal_core::spec::parse_app(&format!(
            "name = \"web\"\n[component]\ndigest = \"{}\"\nkind = \"job\"\n",
            used.module.digest
        ))
        .unwrap()
        .resolve(used.module.digest.clone())
        .unwrap();
        let revision = Revision {
            app: spec.key(),
            number: 3,
            template: spec.template(),
            hash: String::new(),
            created_at: 0,
            cause: "created".into(),
            undid: None,
            outcome: None,
        };
        let modules = [used, fresh, reapplied, idle];
        let gone = unused(
            &modules,
            std::slice::from_ref(&revision),
            10_000,
            Duration::from_secs(1),
        );
        let gone: Vec<&str> = gone.iter().map(|m| m.module.digest.as_str()).collect();
        assert_eq!(gone, [modules[3].module.digest.as_str()]);
        assert_eq!(
            users(&[revision])[modules[0].module.digest.as_str()],
            ["app default/web revision 3"]
        );
    }

    /// The race the module doc speaks of: a collection read the module, an apply made a
    /// revision of it meanwhile; the collection's delete must fail.
    #[test]
    fn an_apply_between_a_collections_reads_and_its_delete_keeps_the_module() {
        let dir = tempfile::tempdir().unwrap();
        let cp = crate::state::tests::control_plane(dir.path());
        let digest = crate::state::tests::uploaded(&cp);
        let read = cp.modules_read().unwrap();
        let src = format!(
            "name = \"web\"\n[component]\ndigest = \"{digest}\"\nkind = \"http\"\n[http]\nroutes = [\"/web\"]\n"
        );
        let spec = shoal_core::spec::parse_app(&src)
            .unwrap()
            .resolve(digest.clone())
            .unwrap();
        cp.apply(spec, false).unwrap();
        assert!(!cp.delete_module_record(&read[0], "test").unwrap());
        assert!(cp.get::<Module>(&keys::module(&digest)).unwrap().is_some());
        assert_eq!(cp.collect_modules(Duration::ZERO).unwrap(), 0, "in use");
    }

    /// An upload that found the file of a module being deleted, and is recorded after the
    /// delete: refused, not recorded with no file under it (nodes would find none).
    #[tokio::test]
    async fn an_upload_of_a_module_deleted_meanwhile_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cp = crate::state::tests::control_plane(dir.path());
        let upload = || {
            let bytes = bytes::Bytes::from_static(b"\0asm\x0d\0\x01\0");
            cp.blobs()
                .put_stream(futures::stream::iter([Ok::<_, String>(bytes)]), 1 << 20)
        };
        let first = upload().await.unwrap();
        cp.register_module(&first.digest, first.size, first.existed, None)
            .unwrap();
        let again = upload().await.unwrap();
        assert!(again.existed);
        cp.delete_module(&again.digest).unwrap();
        let e = cp
            .register_module(&again.digest, again.size, again.existed, None)
            .unwrap_err();
        assert!(e.to_string().contains("deleted as it was uploaded"), "{e}");
        assert!(
            cp.get::<Module>(&keys::module(&again.digest))
                .unwrap()
                .is_none()
        );
    }
}
