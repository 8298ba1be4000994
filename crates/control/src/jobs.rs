//! The jobs API: `shoal job run` (a run asked for now, recorded in the app for
//! the controller to start under the job's concurrency policy) and `shoal get
//! jobs` (each job's schedule, runs and next firing).

use crate::error::ControlError;
use crate::state::{ControlPlane, encode};
use shoal_api::{JobRun, JobSummary, RunView};
use shoal_core::objects::keys;
use shoal_core::problem::ErrorCode;
use shoal_core::spec::AppKey;
use shoal_core::{App, Kind, Replica};
use shoal_store::{Op, Txn};
use std::collections::HashMap;

/// Tries of a guarded write that the controller's own writes of the app
/// record (its job status) may void.
const TRIES: usize = 5;

impl ControlPlane {
    /// Records that a run of job `key` is wanted now and kicks the controller,
    /// whose next pass starts it (or skips it, under `concurrency =
    /// "forbid"`). A request not dealt with yet is the one answered again: two
    /// quick asks make one run, as two quick firings would.
    pub(crate) fn run_job(&self, key: &AppKey) -> Result<JobRun, ControlError> {
        let app_key = keys::app(key);
        for _ in 0..TRIES {
            let Some((mut app, mod_rev)) = self.get::<App>(&app_key)? else {
                return Err(ControlError::not_found(format!("app {key} does not exist")));
            };
            if app.spec.component.kind != Kind::Job {
                return Err(ControlError::invalid(
                    ErrorCode::BadRequest,
                    format!(
                        "app {key} is kind = \"{}\": only job apps have runs to start",
                        app.spec.component.kind
                    ),
                ));
            }
            if let Some(at) = app.job.run_requested {
                self.inner.kick.notify_one();
                return Ok(JobRun {
                    app: key.clone(),
                    requested_at: at,
                });
            }
            let now = self.now();
            app.job.run_requested = Some(now);
            let txn = Txn::new()
                .when_mod_revision(&app_key, mod_rev)
                .then(Op::put(&app_key, encode(&app)));
            if self.store().txn(txn)?.succeeded {
                self.inner.kick.notify_one();
                return Ok(JobRun {
                    app: key.clone(),
                    requested_at: now,
                });
            }
        }
        Err(ControlError::conflict(format!(
            "app {key} kept changing while a run was asked for; try again"
        )))
    }

    /// Every job app (of `namespace`, if given) with its runs.
    pub(crate) fn jobs(&self, namespace: Option<&str>) -> Result<Vec<JobSummary>, ControlError> {
        let mut runs: HashMap<AppKey, Vec<Replica>> = HashMap::new();
        for r in self.list::<Replica>(&keys::REPLICAS)? {
            if r.kind == Kind::Job {
                runs.entry(r.app.clone()).or_default().push(r);
            }
        }
        let now = self.now();
        let mut out = Vec::new();
        for app in self.list::<App>(&keys::APPS)? {
            if app.spec.component.kind != Kind::Job
                || namespace.is_some_and(|ns| ns != app.spec.namespace)
            {
                continue;
            }
            let key = app.spec.key();
            let runs = runs.remove(&key).unwrap_or_default();
            let last = runs
                .iter()
                .max_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
            let policy = &app.spec.runs;
            out.push(JobSummary {
                namespace: key.namespace,
                name: key.name,
                schedule: policy.schedule.clone(),
                timezone: policy.timezone.clone(),
                concurrency: policy.concurrency,
                active: runs.iter().filter(|r| !r.phase.is_terminal()).count(),
                last_run: last.map(|r| RunView {
                    replica: r.id.clone(),
                    phase: r.phase,
                    scheduled_at: r.scheduled_at,
                    created_at: r.created_at,
                    updated_at: r.updated_at,
                }),
                next: policy.cron().and_then(|c| c.next_after(now)),
                run_requested: app.job.run_requested,
                created_at: app.created_at,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::{control_plane, uploaded};
    use shoal_core::spec::parse_app;

    /// Applies app `name` of `kind` with `extra` TOML appended, its module recorded.
    fn apply(cp: &ControlPlane, name: &str, kind: &str, extra: &str) {
        let digest = uploaded(cp);
        let src = format!(
            "name = \"{name}\"\n[component]\ndigest = \"{digest}\"\nkind = \"{kind}\"\n{extra}"
        );
        cp.apply(parse_app(&src).unwrap().resolve(digest).unwrap(), false)
            .unwrap();
    }

    #[test]
    fn a_run_asked_for_is_recorded_once_until_dealt_with() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        apply(&cp, "nightly", "job", "[job]\nschedule = \"0 3 * * *\"\n");
        let key = AppKey::new("default", "nightly");
        let first = cp.run_job(&key).unwrap();
        assert_eq!(
            cp.app(&key).unwrap().job.run_requested,
            Some(first.requested_at)
        );
        let again = cp.run_job(&key).unwrap();
        assert_eq!(again.requested_at, first.requested_at);

        apply(&cp, "web", "http", "");
        let e = cp.run_job(&AppKey::new("default", "web")).unwrap_err();
        assert!(e.to_string().contains("only job apps"), "{e}");
        assert!(cp.run_job(&AppKey::new("default", "ghost")).is_err());
    }

    #[test]
    fn jobs_list_schedules_and_next_firings() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        apply(
            &cp,
            "nightly",
            "job",
            "[job]\nschedule = \"0 3 * * *\"\ntimezone = \"Asia/Seoul\"\n",
        );
        apply(&cp, "once", "job", "");
        apply(&cp, "web", "http", "");
        let jobs = cp.jobs(None).unwrap();
        let names: Vec<&str> = jobs.iter().map(|j| j.name.as_str()).collect();
        assert_eq!(names, ["nightly", "once"]);
        let next = jobs[0].next.unwrap();
        // 03:00 in Seoul is 18:00 UTC, within a day from now.
        assert_eq!(next % 86_400_000, 18 * 3_600_000);
        assert!(next > cp.now() && next - cp.now() <= 86_400_000);
        assert_eq!(jobs[1].next, None);
        assert!(cp.jobs(Some("other")).unwrap().is_empty());
    }

    #[test]
    fn a_new_schedule_counts_from_its_apply() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path());
        let key = AppKey::new("default", "j");
        apply(&cp, "j", "job", "");
        assert_eq!(cp.app(&key).unwrap().job.last_scheduled, None);
        apply(&cp, "j", "job", "[job]\nschedule = \"* * * * *\"\n");
        let applied = cp.app(&key).unwrap();
        assert_eq!(applied.job.last_scheduled, Some(applied.updated_at));
        // Other settings leave it be.
        apply(
            &cp,
            "j",
            "job",
            "[job]\nschedule = \"* * * * *\"\nconcurrency = \"forbid\"\n",
        );
        assert_eq!(cp.app(&key).unwrap().job, applied.job);
    }
}
