//! Lease-based leader election (coordination.k8s.io/v1), so two or more
//! replicas can run and exactly one reconciles.
//!
//! kube 5 ships no leader-election helper, so this is a small elector in the
//! client-go style: every `retry_period` each replica reads the Lease and
//! either renews it (holder), takes it over when it is free or expired, or
//! follows. Every write is a `replace` carrying the `resourceVersion` that was
//! read (or a `create` when there is no Lease), so two replicas racing for an
//! expired Lease cannot both win: the loser gets 409 Conflict and follows.
//!
//! Losing the lease is handled by exiting the process with a non-zero status
//! (see `main.rs`): the in-flight reconciles, watches and caches all belong to
//! the old term, and a restart by the kubelet is the simplest way to be sure
//! none of them writes after another replica has taken over. Expiry is
//! judged against `renewTime` with the local clock, which assumes node clocks
//! are synchronised to well under the lease duration (NTP).

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    Client,
    api::{Api, PostParams},
};
use tokio::sync::watch;

use crate::{
    config::LeaderConfig,
    error::{Error, Result},
    metrics::Metrics,
};

/// What a replica should do with the Lease it just read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// There is no Lease yet: create it, holding it.
    Create,
    /// This replica holds the Lease: renew it.
    Renew,
    /// The Lease is free or expired: take it over.
    Acquire,
    /// Another replica holds a valid Lease until `expires`.
    Follow {
        /// The current holder.
        holder: String,
        /// When the holder's term ends unless it renews.
        expires: Timestamp,
    },
}

/// Pure decision: given the Lease's spec (if any), who this replica is and
/// the time now, what to do. `default_duration` covers a Lease that does not
/// state its own duration.
#[must_use]
pub fn decide(
    spec: Option<&LeaseSpec>,
    identity: &str,
    now: Timestamp,
    default_duration: Duration,
) -> Decision {
    let Some(spec) = spec else {
        return Decision::Create;
    };
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder.is_empty() {
        return Decision::Acquire;
    }
    if holder == identity {
        return Decision::Renew;
    }
    let duration = spec
        .lease_duration_seconds
        .filter(|s| *s > 0)
        .map_or(default_duration, |s| {
            Duration::from_secs(u64::from(s.unsigned_abs()))
        });
    let Some(last) = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) else {
        // Held but never renewed: treat as expired, nothing proves it is alive.
        return Decision::Acquire;
    };
    let expires = last
        .0
        .checked_add(SignedDuration::try_from(duration).unwrap_or(SignedDuration::MAX))
        .unwrap_or(Timestamp::MAX);
    if now >= expires {
        Decision::Acquire
    } else {
        Decision::Follow {
            holder: holder.to_owned(),
            expires,
        }
    }
}

/// The spec this replica writes when it creates, renews or takes over a Lease.
#[must_use]
pub fn next_spec(
    current: Option<&LeaseSpec>,
    decision: &Decision,
    identity: &str,
    now: Timestamp,
    duration: Duration,
) -> Option<LeaseSpec> {
    let seconds = i32::try_from(duration.as_secs()).unwrap_or(i32::MAX);
    match decision {
        Decision::Follow { .. } => None,
        Decision::Create => Some(LeaseSpec {
            holder_identity: Some(identity.to_owned()),
            lease_duration_seconds: Some(seconds),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(0),
            ..LeaseSpec::default()
        }),
        Decision::Renew => {
            let mut spec = current.cloned().unwrap_or_default();
            spec.renew_time = Some(MicroTime(now));
            spec.lease_duration_seconds = Some(seconds);
            Some(spec)
        }
        Decision::Acquire => {
            let current = current.cloned().unwrap_or_default();
            Some(LeaseSpec {
                holder_identity: Some(identity.to_owned()),
                lease_duration_seconds: Some(seconds),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(current.lease_transitions.unwrap_or(0).saturating_add(1)),
                ..current
            })
        }
    }
}

/// Whether a replica that last renewed at `last_renew` must give up at `now`.
#[must_use]
pub fn renew_deadline_passed(
    last_renew: std::time::Instant,
    now: std::time::Instant,
    deadline: Duration,
) -> bool {
    now.saturating_duration_since(last_renew) >= deadline
}

/// Runs the election for one replica.
#[derive(Clone)]
pub struct LeaderElector {
    api: Api<Lease>,
    cfg: LeaderConfig,
}

impl std::fmt::Debug for LeaderElector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderElector")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

fn is_conflict(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(s) if s.code == 409)
}

impl LeaderElector {
    /// An elector for the Lease named in `cfg`.
    #[must_use]
    pub fn new(client: Client, cfg: LeaderConfig) -> Self {
        let api = Api::namespaced(client, &cfg.lease_namespace);
        Self { api, cfg }
    }

    fn lease_err(&self, operation: &'static str) -> impl FnOnce(kube::Error) -> Error + '_ {
        move |source| Error::Lease {
            operation,
            namespace: self.cfg.lease_namespace.clone(),
            name: self.cfg.lease_name.clone(),
            source,
        }
    }

    /// One round: read the Lease and create / renew / take it over when the
    /// decision says so. `Ok(true)` while this replica holds the Lease;
    /// `Ok(false)` when another holds it or a concurrent writer won the race.
    ///
    /// # Errors
    /// API errors other than 409 Conflict / 409 AlreadyExists.
    pub async fn try_acquire_or_renew(&self) -> Result<bool> {
        let now = Timestamp::now();
        let current = self
            .api
            .get_opt(&self.cfg.lease_name)
            .await
            .map_err(self.lease_err("get"))?;
        let spec = current.as_ref().and_then(|l| l.spec.as_ref());
        let decision = decide(spec, &self.cfg.identity, now, self.cfg.lease_duration);
        let Some(next) = next_spec(
            spec,
            &decision,
            &self.cfg.identity,
            now,
            self.cfg.lease_duration,
        ) else {
            return Ok(false);
        };
        let result = match current {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.cfg.lease_name.clone()),
                        namespace: Some(self.cfg.lease_namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(next),
                };
                self.api
                    .create(&PostParams::default(), &lease)
                    .await
                    .map_err(self.lease_err("create"))
            }
            Some(mut lease) => {
                // `lease.metadata.resourceVersion` is the one just read: the
                // replace fails with 409 if anyone wrote in between.
                lease.spec = Some(next);
                self.api
                    .replace(&self.cfg.lease_name, &PostParams::default(), &lease)
                    .await
                    .map_err(self.lease_err("replace"))
            }
        };
        match result {
            Ok(_) => {
                if decision == Decision::Acquire || decision == Decision::Create {
                    tracing::info!(identity = %self.cfg.identity, lease = %self.cfg.lease_name, "acquired leadership");
                }
                Ok(true)
            }
            Err(Error::Lease { source, .. }) if is_conflict(&source) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this replica holds the Lease, then keeps renewing it.
    /// `leading` is set to `true` on acquisition. Returns only when
    /// leadership is lost (not renewed within the renew deadline); the caller
    /// must then stop reconciling.
    pub async fn run(&self, leading: watch::Sender<bool>, metrics: Metrics) -> Error {
        // Acquire.
        loop {
            match tokio::time::timeout(self.cfg.renew_deadline, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => break,
                Ok(Ok(false)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "leader election attempt failed"),
                Err(_) => tracing::warn!("leader election attempt timed out"),
            }
            tokio::time::sleep(jittered(self.cfg.retry_period)).await;
        }
        metrics.leader.set(1);
        let _ = leading.send(true);
        let mut last_renew = std::time::Instant::now();
        // Renew.
        loop {
            tokio::time::sleep(self.cfg.retry_period).await;
            // A hung request must not outlive the deadline: bound each
            // attempt by the time left until it.
            let left = self
                .cfg
                .renew_deadline
                .saturating_sub(last_renew.elapsed())
                .max(Duration::from_millis(100));
            match tokio::time::timeout(left, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => last_renew = std::time::Instant::now(),
                Ok(Ok(false)) => {
                    // Someone else holds it: our term is over right now.
                    return self.lost(&leading, &metrics, last_renew);
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "renewing the leader lease failed"),
                Err(_) => tracing::warn!(timeout = ?left, "renewing the leader lease timed out"),
            }
            if renew_deadline_passed(
                last_renew,
                std::time::Instant::now(),
                self.cfg.renew_deadline,
            ) {
                return self.lost(&leading, &metrics, last_renew);
            }
        }
    }

    fn lost(
        &self,
        leading: &watch::Sender<bool>,
        metrics: &Metrics,
        last_renew: std::time::Instant,
    ) -> Error {
        metrics.leader.set(0);
        let _ = leading.send(false);
        Error::LeadershipLost {
            namespace: self.cfg.lease_namespace.clone(),
            name: self.cfg.lease_name.clone(),
            elapsed: last_renew.elapsed(),
        }
    }

    /// Gives the Lease up on graceful shutdown (clears the holder) so the
    /// other replica takes over at its next attempt instead of waiting for
    /// expiry. Best effort: does nothing unless this replica is the holder.
    ///
    /// # Errors
    /// API errors of the read or the replace.
    pub async fn release(&self) -> Result<()> {
        let Some(mut lease) = self
            .api
            .get_opt(&self.cfg.lease_name)
            .await
            .map_err(self.lease_err("get"))?
        else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        self.api
            .replace(&self.cfg.lease_name, &PostParams::default(), &lease)
            .await
            .map_err(self.lease_err("replace"))?;
        Ok(())
    }
}

/// `base` plus up to 20% random jitter, so replicas do not retry in lockstep.
fn jittered(base: Duration) -> Duration {
    let extra = rand::random::<f64>() * 0.2;
    base.mul_f64(1.0 + extra)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: &str = "op-a";
    const DUR: Duration = Duration::from_secs(15);

    fn ts(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn held_by(holder: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            acquire_time: Some(MicroTime(ts(0))),
            renew_time: Some(MicroTime(ts(renewed))),
            lease_transitions: Some(3),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn no_lease_is_created() {
        assert_eq!(decide(None, ME, ts(0), DUR), Decision::Create);
        let spec = next_spec(None, &Decision::Create, ME, ts(0), DUR).unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some(ME));
        assert_eq!(spec.lease_transitions, Some(0));
        assert_eq!(spec.lease_duration_seconds, Some(15));
    }

    #[test]
    fn own_lease_is_renewed_without_a_transition() {
        let current = held_by(ME, 5);
        let d = decide(Some(&current), ME, ts(100), DUR);
        assert_eq!(
            d,
            Decision::Renew,
            "even when expired, the holder renews its own lease"
        );
        let spec = next_spec(Some(&current), &d, ME, ts(100), DUR).unwrap();
        assert_eq!(spec.renew_time, Some(MicroTime(ts(100))));
        assert_eq!(spec.acquire_time, Some(MicroTime(ts(0))));
        assert_eq!(spec.lease_transitions, Some(3));
    }

    #[test]
    fn valid_foreign_lease_is_followed() {
        let current = held_by("op-b", 10);
        assert_eq!(
            decide(Some(&current), ME, ts(24), DUR),
            Decision::Follow {
                holder: "op-b".into(),
                expires: ts(25)
            }
        );
        assert_eq!(
            next_spec(
                Some(&current),
                &decide(Some(&current), ME, ts(24), DUR),
                ME,
                ts(24),
                DUR
            ),
            None
        );
    }

    #[test]
    fn expired_foreign_lease_is_taken_over() {
        let current = held_by("op-b", 10);
        let d = decide(Some(&current), ME, ts(25), DUR);
        assert_eq!(d, Decision::Acquire);
        let spec = next_spec(Some(&current), &d, ME, ts(25), DUR).unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some(ME));
        assert_eq!(spec.acquire_time, Some(MicroTime(ts(25))));
        assert_eq!(spec.lease_transitions, Some(4));
    }

    #[test]
    fn released_lease_is_acquired_immediately() {
        let mut current = held_by("op-b", 10);
        current.holder_identity = None;
        assert_eq!(decide(Some(&current), ME, ts(11), DUR), Decision::Acquire);
    }

    #[test]
    fn lease_duration_of_the_lease_wins_over_the_default() {
        let mut current = held_by("op-b", 10);
        current.lease_duration_seconds = Some(60);
        assert!(matches!(
            decide(Some(&current), ME, ts(30), DUR),
            Decision::Follow { .. }
        ));
        assert_eq!(decide(Some(&current), ME, ts(70), DUR), Decision::Acquire);
    }

    #[test]
    fn renew_deadline() {
        let t0 = std::time::Instant::now();
        assert!(!renew_deadline_passed(
            t0,
            t0 + Duration::from_secs(9),
            Duration::from_secs(10)
        ));
        assert!(renew_deadline_passed(
            t0,
            t0 + Duration::from_secs(10),
            Duration::from_secs(10)
        ));
    }
}
