//! What nodes report to the server they talk to, shared with the other servers of a shared
//! store (`shoal server --store etcd://…`): gateway measurements, guests' CPU, requests held
//! for apps at zero, and memory. These stay in each server's memory ([`crate::measurements`]),
//! but the leader's controller scales apps, wakes them and judges canary steps on them, and
//! `shoal top` reads them on any server: each must see every node's, not only those of the
//! nodes that happen to talk to it.
//!
//! Why through the store rather than server to server: servers need no addresses or
//! credentials for each other, and a report reaches every server, the next leader included.
//! Each server buffers what its nodes said and puts it, once a second, as one batch under its
//! own key `reports/{server}`; every server watches `reports/` and records the others'
//! batches. Overwriting one key per server keeps the store's size flat; the watch still sees
//! every version. The keys are outside `/`, so node watches never carry them. Reports are
//! measurements, not state: a batch lost to a failed write or a restarted watch is a second
//! of load missed, as a lost node report is.

use serde::{Deserialize, Serialize};
use shoal_api::{AppCpu, NodeUsage, Waiting};
use shoal_core::metrics::RevisionStats;
use shoal_store::{EventKind, Op, Txn};
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use crate::state::{ControlPlane, blocking};

/// The key prefix of every server's batch.
const PREFIX: &str = "reports/";
/// How often a server puts what its nodes reported: as often as they report.
const PERIOD: Duration = Duration::from_secs(1);
/// Reports a server holds while it cannot write them; older ones are dropped first.
const MAX_PENDING: usize = 10_000;
/// A batch's size at most, well under etcd's 1.5 MiB request limit; more goes in another.
const MAX_BATCH_BYTES: usize = 1 << 20;

/// One thing a node told a server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum Report {
    Metrics {
        node: String,
        stats: Vec<RevisionStats>,
    },
    Cpu {
        node: String,
        usage: Vec<AppCpu>,
    },
    Waiting {
        node: String,
        waiting: Vec<Waiting>,
    },
    Usage {
        node: String,
        usage: NodeUsage,
    },
}

/// What one server puts at a time.
#[derive(Debug, Serialize, Deserialize)]
struct Batch {
    server: String,
    reports: Vec<Report>,
}

/// A server's reports not yet put, and the name its batches go under.
pub(crate) struct Outbox {
    server: String,
    pending: Mutex<VecDeque<Report>>,
}

impl Outbox {
    /// An outbox under a name of its own: random, so that two servers never share one.
    pub(crate) fn new() -> Outbox {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).expect("the OS gives random bytes");
        Outbox {
            server: bytes.iter().map(|b| format!("{b:02x}")).collect(),
            pending: Mutex::new(VecDeque::new()),
        }
    }

    pub(crate) fn push(&self, report: Report) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if pending.len() >= MAX_PENDING {
            pending.pop_front();
        }
        pending.push_back(report);
    }

    fn take(&self) -> Vec<Report> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.drain(..).collect()
    }
}

/// `reports` in batches of at most [`MAX_BATCH_BYTES`] of JSON each (a single larger report
/// goes alone), in order.
fn batches(server: &str, reports: Vec<Report>) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut batch = Batch {
        server: server.to_string(),
        reports: Vec::new(),
    };
    let mut size = 0;
    for report in reports {
        // Its JSON and the comma before the next.
        let len = serde_json::to_vec(&report).map_or(0, |v| v.len()) + 1;
        if !batch.reports.is_empty() && size + len > MAX_BATCH_BYTES {
            out.push(serde_json::to_vec(&batch).expect("batches serialise"));
            batch.reports.clear();
            size = 0;
        }
        size += len;
        batch.reports.push(report);
    }
    if !batch.reports.is_empty() {
        out.push(serde_json::to_vec(&batch).expect("batches serialise"));
    }
    out
}

impl ControlPlane {
    /// Shares what this server's nodes report with the other servers of the store, and records
    /// what theirs report, until the process ends. Returns at once unless the store is shared.
    pub async fn share_reports(self) {
        if self.inner.outbox.is_none() {
            return;
        }
        tokio::join!(self.clone().put_reports(), self.follow_reports());
    }

    async fn put_reports(self) {
        let Some(outbox) = &self.inner.outbox else {
            return;
        };
        let key = format!("{PREFIX}{}", outbox.server);
        let mut tick = tokio::time::interval(PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let reports = outbox.take();
            if reports.is_empty() {
                continue;
            }
            for batch in batches(&outbox.server, reports) {
                let (cp, key) = (self.clone(), key.clone());
                let put = blocking(move || {
                    cp.inner
                        .store
                        .txn(Txn::new().then(Op::put(key, batch)))
                        .map_err(Into::into)
                })
                .await;
                if let Err(e) = put {
                    tracing::warn!(error = %e, "cannot share the nodes' reports with the other servers");
                }
            }
        }
    }

    /// Records the batches the other servers put, from now on; a watch that ends is started
    /// again from the store's revision then (what was missed meanwhile is a gap in load).
    async fn follow_reports(self) {
        let Some(outbox) = &self.inner.outbox else {
            return;
        };
        loop {
            let cp = self.clone();
            let watch = blocking(move || {
                let from = cp.inner.store.revision() + 1;
                cp.inner.store.watch(PREFIX, from).map_err(Into::into)
            })
            .await;
            let mut watch = match watch {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch the other servers' reports; retrying");
                    tokio::time::sleep(PERIOD).await;
                    continue;
                }
            };
            while let Some(event) = watch.next().await {
                let event = match event {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::debug!(error = %e, "the watch of reports ended; starting again");
                        break;
                    }
                };
                if event.kind != EventKind::Put {
                    continue;
                }
                match serde_json::from_slice::<Batch>(&event.kv.value) {
                    Ok(batch) if batch.server == outbox.server => {}
                    Ok(batch) => {
                        let cp = self.clone();
                        // Recording metrics reads the apps' current revisions from the store.
                        let _ = blocking(move || {
                            batch.reports.into_iter().for_each(|r| cp.record_here(r));
                            Ok(())
                        })
                        .await;
                    }
                    Err(e) => {
                        tracing::warn!(key = %event.kv.key, error = %e, "unreadable reports from another server");
                    }
                }
            }
        }
    }

    /// Passes what a node reported here on to the other servers, if the store is shared.
    pub(crate) fn share(&self, report: impl FnOnce() -> Report) {
        if let Some(outbox) = &self.inner.outbox {
            outbox.push(report());
        }
    }

    /// Records a report as if its node had sent it here.
    fn record_here(&self, report: Report) {
        match report {
            Report::Metrics { node, stats } => self.note_metrics(&node, stats),
            Report::Cpu { node, usage } => self.note_cpu(&node, usage),
            Report::Waiting { node, waiting } => self.note_waiting(&node, waiting),
            Report::Usage { node, usage } => {
                self.inner
                    .metrics
                    .set_usage(&node, usage, self.steady_now());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_core::spec::AppKey;

    fn waiting(node: &str, requests: u32) -> Report {
        Report::Waiting {
            node: node.into(),
            waiting: vec![Waiting {
                app: AppKey::new("default", "hello"),
                requests,
            }],
        }
    }

    #[test]
    fn reports_go_in_batches_under_the_size_limit_in_order() {
        let reports: Vec<Report> = (0..50_000).map(|i| waiting(&format!("n{i}"), 1)).collect();
        let out = batches("s1", reports.clone());
        assert!(out.len() > 1, "more than a batch's worth");
        let mut back = Vec::new();
        for bytes in &out {
            assert!(bytes.len() <= MAX_BATCH_BYTES + 100, "{}", bytes.len());
            let batch: Batch = serde_json::from_slice(bytes).unwrap();
            assert_eq!(batch.server, "s1");
            back.extend(batch.reports);
        }
        assert_eq!(back, reports);
        assert!(batches("s1", Vec::new()).is_empty());
    }

    #[test]
    fn an_outbox_keeps_the_newest_reports_when_full_and_has_a_name_of_its_own() {
        let outbox = Outbox::new();
        for i in 0..MAX_PENDING + 5 {
            outbox.push(waiting("n1", i as u32));
        }
        let taken = outbox.take();
        assert_eq!(taken.len(), MAX_PENDING);
        assert_eq!(taken[0], waiting("n1", 5));
        assert!(outbox.take().is_empty());
        assert_ne!(Outbox::new().server, outbox.server);
    }
}
