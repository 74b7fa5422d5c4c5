//! Command-line and environment configuration of the operator binary: one
//! clap [`Args`] struct (every flag also reads an env var), turned into the
//! typed [`Config`] the rest of the crate uses.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use clap::Parser;

/// Flags of `hndsr-operator`. Every flag can also be set by the env var
/// named next to it.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "hndsr-operator",
    version,
    about = "Reconciles HndsrService resources."
)]
pub struct Args {
    /// Only watch and reconcile this namespace (children and pods too).
    /// Unset: every namespace (needs the ClusterRole).
    #[arg(long, env = "HNDSR_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,

    /// Address of the HTTP server for /metrics, /healthz and /readyz.
    #[arg(long, env = "HNDSR_METRICS_ADDR", default_value = "0.0.0.0:8081")]
    pub metrics_addr: SocketAddr,

    /// Run leader election on a Lease so several replicas can run; only the
    /// leader reconciles.
    #[arg(
        long,
        env = "HNDSR_LEADER_ELECTION",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub leader_election: bool,

    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "HNDSR_LEASE_NAME",
        default_value = "hndsr-operator-leader"
    )]
    pub lease_name: String,

    /// Namespace of the Lease; defaults to the pod's namespace (`POD_NAMESPACE`).
    #[arg(long, env = "HNDSR_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,

    /// How long a lease is valid without renewal; failover happens within it.
    #[arg(long, env = "HNDSR_LEASE_DURATION_SECONDS", default_value_t = 15)]
    pub lease_duration_seconds: u64,

    /// The leader gives up (and exits) when it could not renew for this long.
    /// Must be shorter than the lease duration.
    #[arg(long, env = "HNDSR_RENEW_DEADLINE_SECONDS", default_value_t = 10)]
    pub renew_deadline_seconds: u64,

    /// Interval between acquire/renew attempts.
    #[arg(long, env = "HNDSR_RETRY_PERIOD_SECONDS", default_value_t = 2)]
    pub retry_period_seconds: u64,

    /// Identity written into the Lease; defaults to `POD_NAME`, then the host name.
    #[arg(long, env = "HNDSR_IDENTITY")]
    pub identity: Option<String>,

    /// Emit JSON logs.
    #[arg(long, env = "HNDSR_LOG_JSON", default_value_t = false, action = clap::ArgAction::Set)]
    pub log_json: bool,

    /// Image of the init container that downloads `weights.uri` (needs
    /// `sh`, `wget` with TLS and `sha256sum`); a mirror for air-gapped
    /// clusters.
    #[arg(long, env = "HNDSR_FETCHER_IMAGE", default_value = crate::builders::DEFAULT_FETCHER_IMAGE)]
    pub fetcher_image: String,

    /// The cluster's DNS domain, for `status.endpoint`.
    #[arg(long, env = "HNDSR_CLUSTER_DOMAIN", default_value = crate::builders::DEFAULT_CLUSTER_DOMAIN)]
    pub cluster_domain: String,

    /// PriorityClass of capacity placeholders whose spec names none (the
    /// chart's `placeholderPriorityClass.name`); it must have a negative
    /// value so every real pod preempts them.
    #[arg(long, env = "HNDSR_PLACEHOLDER_PRIORITY_CLASS", default_value = crate::builders::DEFAULT_PLACEHOLDER_PRIORITY_CLASS)]
    pub placeholder_priority_class: String,

    /// Prometheus URL KEDA's `prometheus` scalers query for services with
    /// `autoscaling.provider: keda` (the one that scrapes the server pods
    /// and this operator). Unset: such services report
    /// `Degraded/KedaNotConfigured`.
    #[arg(long, env = "HNDSR_KEDA_PROMETHEUS_URL")]
    pub keda_prometheus_url: Option<String>,

    /// Address of the zero responder, which answers requests to services
    /// at zero replicas with 503 + Retry-After and wakes them.
    #[arg(
        long,
        env = "HNDSR_ZERO_RESPONDER_ADDR",
        default_value = "0.0.0.0:8082"
    )]
    pub zero_responder_addr: SocketAddr,

    /// IP the Services of services at zero send requests to: this pod's
    /// (the chart passes `POD_IP` from the downward API). Defaults to
    /// `POD_IP`; unset, scale to zero reports `Degraded/KedaNotConfigured`.
    #[arg(long, env = "HNDSR_ZERO_RESPONDER_IP")]
    pub zero_responder_ip: Option<IpAddr>,

    /// `Retry-After` seconds of the zero responder's 503s.
    #[arg(long, env = "HNDSR_ZERO_RETRY_AFTER_SECONDS", default_value_t = crate::zero::DEFAULT_RETRY_AFTER_SECONDS)]
    pub zero_retry_after_seconds: u32,
}

/// Leader-election settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderConfig {
    /// Lease name.
    pub lease_name: String,
    /// Lease namespace.
    pub lease_namespace: String,
    /// Holder identity of this replica.
    pub identity: String,
    /// Lease validity without renewal.
    pub lease_duration: Duration,
    /// Give up leadership when not renewed for this long.
    pub renew_deadline: Duration,
    /// Interval between attempts.
    pub retry_period: Duration,
}

/// Typed configuration of the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `None`: all namespaces.
    pub watch_namespace: Option<String>,
    /// Bind address of the metrics/probe server.
    pub metrics_addr: SocketAddr,
    /// `None`: leader election disabled (single replica).
    pub leader: Option<LeaderConfig>,
    /// Identity used as the event reporter instance.
    pub identity: String,
    /// JSON logs.
    pub log_json: bool,
    /// Image of the `weights.uri` fetcher.
    pub fetcher_image: String,
    /// Cluster DNS domain.
    pub cluster_domain: String,
    /// Default PriorityClass of capacity placeholders.
    pub placeholder_priority_class: String,
    /// Prometheus of KEDA's scalers.
    pub keda_prometheus_url: Option<String>,
    /// Bind address of the zero responder.
    pub zero_responder_addr: SocketAddr,
    /// Where Services at zero point (IP + the responder's port).
    pub zero_responder: Option<SocketAddr>,
    /// `Retry-After` of the zero responder.
    pub zero_retry_after_seconds: u32,
}

/// Invalid combinations of flags, reported at start-up.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The renew deadline must leave room before the lease expires.
    #[error(
        "--renew-deadline-seconds ({renew}) must be shorter than --lease-duration-seconds ({duration})"
    )]
    RenewDeadline {
        /// Renew deadline.
        renew: u64,
        /// Lease duration.
        duration: u64,
    },
    /// The retry period must be shorter than the renew deadline.
    #[error(
        "--retry-period-seconds ({retry}) must be shorter than --renew-deadline-seconds ({renew})"
    )]
    RetryPeriod {
        /// Retry period.
        retry: u64,
        /// Renew deadline.
        renew: u64,
    },
    /// Leader election needs a namespace for its Lease.
    #[error(
        "leader election needs the Lease namespace: set --lease-namespace or POD_NAMESPACE (downward API)"
    )]
    NoLeaseNamespace,
    /// Durations of zero make no sense.
    #[error("lease durations must be positive")]
    ZeroDuration,
    /// A setting that names something must not be empty.
    #[error("{0} must not be empty")]
    Empty(&'static str),
    /// A URL that is not `http(s)://host...`.
    #[error("--keda-prometheus-url {0:?} must be an http:// or https:// URL")]
    PrometheusUrl(String),
    /// The responder's IP from `POD_IP` does not parse.
    #[error("POD_IP {0:?} is not an IP address (set --zero-responder-ip)")]
    PodIp(String),
    /// A zero Retry-After would invite a retry storm.
    #[error("--zero-retry-after-seconds must be at least 1")]
    ZeroRetryAfter,
}

impl Args {
    /// Turns the flags into [`Config`]; `env` looks up `POD_NAMESPACE`,
    /// `POD_NAME` and `HOSTNAME` (a parameter so tests need no process env).
    ///
    /// # Errors
    /// [`ConfigError`] for inconsistent lease timings or a missing Lease namespace.
    pub fn into_config(self, env: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let identity = self
            .identity
            .or_else(|| env("POD_NAME"))
            .or_else(|| env("HOSTNAME"))
            .unwrap_or_else(|| format!("hndsr-operator-{}", std::process::id()));
        let leader = if self.leader_election {
            if self.lease_duration_seconds == 0
                || self.renew_deadline_seconds == 0
                || self.retry_period_seconds == 0
            {
                return Err(ConfigError::ZeroDuration);
            }
            if self.renew_deadline_seconds >= self.lease_duration_seconds {
                return Err(ConfigError::RenewDeadline {
                    renew: self.renew_deadline_seconds,
                    duration: self.lease_duration_seconds,
                });
            }
            if self.retry_period_seconds >= self.renew_deadline_seconds {
                return Err(ConfigError::RetryPeriod {
                    retry: self.retry_period_seconds,
                    renew: self.renew_deadline_seconds,
                });
            }
            let lease_namespace = self
                .lease_namespace
                .or_else(|| env("POD_NAMESPACE"))
                .ok_or(ConfigError::NoLeaseNamespace)?;
            Some(LeaderConfig {
                lease_name: self.lease_name,
                lease_namespace,
                identity: identity.clone(),
                lease_duration: Duration::from_secs(self.lease_duration_seconds),
                renew_deadline: Duration::from_secs(self.renew_deadline_seconds),
                retry_period: Duration::from_secs(self.retry_period_seconds),
            })
        } else {
            None
        };
        let fetcher_image = self.fetcher_image.trim().to_owned();
        if fetcher_image.is_empty() {
            return Err(ConfigError::Empty("--fetcher-image"));
        }
        let cluster_domain = self.cluster_domain.trim().trim_matches('.').to_owned();
        if cluster_domain.is_empty() {
            return Err(ConfigError::Empty("--cluster-domain"));
        }
        let placeholder_priority_class = self.placeholder_priority_class.trim().to_owned();
        if placeholder_priority_class.is_empty() {
            return Err(ConfigError::Empty("--placeholder-priority-class"));
        }
        let keda_prometheus_url = match self.keda_prometheus_url.map(|u| u.trim().to_owned()) {
            None => None,
            Some(u) if u.is_empty() => None,
            Some(u) if u.starts_with("http://") || u.starts_with("https://") => Some(u),
            Some(u) => return Err(ConfigError::PrometheusUrl(u)),
        };
        let zero_ip = match (self.zero_responder_ip, env("POD_IP")) {
            (Some(ip), _) => Some(ip),
            (None, Some(pod_ip)) if !pod_ip.trim().is_empty() => Some(
                pod_ip
                    .trim()
                    .parse::<IpAddr>()
                    .map_err(|_| ConfigError::PodIp(pod_ip.clone()))?,
            ),
            (None, _) => None,
        };
        if self.zero_retry_after_seconds == 0 {
            return Err(ConfigError::ZeroRetryAfter);
        }
        Ok(Config {
            keda_prometheus_url,
            zero_responder_addr: self.zero_responder_addr,
            zero_responder: zero_ip.map(|ip| SocketAddr::new(ip, self.zero_responder_addr.port())),
            zero_retry_after_seconds: self.zero_retry_after_seconds,
            watch_namespace: self.watch_namespace.filter(|ns| !ns.is_empty()),
            metrics_addr: self.metrics_addr,
            leader,
            identity,
            log_json: self.log_json,
            fetcher_image,
            cluster_domain,
            placeholder_priority_class,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("hndsr-operator").chain(args.iter().copied()))
            .expect("valid flags")
    }

    fn env(key: &str) -> Option<String> {
        match key {
            "POD_NAMESPACE" => Some("hndsr-system".into()),
            "POD_NAME" => Some("hndsr-operator-abc".into()),
            _ => None,
        }
    }

    #[test]
    fn defaults_come_from_the_downward_api() {
        let cfg = parse(&[]).into_config(env).unwrap();
        let leader = cfg.leader.unwrap();
        assert_eq!(leader.lease_namespace, "hndsr-system");
        assert_eq!(leader.identity, "hndsr-operator-abc");
        assert_eq!(leader.lease_duration, Duration::from_secs(15));
        assert_eq!(cfg.metrics_addr, "0.0.0.0:8081".parse().unwrap());
        assert_eq!(cfg.watch_namespace, None);
        assert_eq!(cfg.fetcher_image, "busybox:1.37");
        assert_eq!(cfg.cluster_domain, "cluster.local");
    }

    #[test]
    fn fetcher_image_and_cluster_domain_are_settings() {
        let cfg = parse(&[
            "--fetcher-image",
            "mirror.example/busybox:1.37",
            "--cluster-domain",
            "corp.internal.",
        ])
        .into_config(env)
        .unwrap();
        assert_eq!(cfg.fetcher_image, "mirror.example/busybox:1.37");
        assert_eq!(
            cfg.cluster_domain, "corp.internal",
            "a trailing dot is dropped"
        );
        let err = parse(&["--fetcher-image", " "])
            .into_config(env)
            .unwrap_err();
        assert_eq!(err, ConfigError::Empty("--fetcher-image"));
    }

    #[test]
    fn keda_and_the_zero_responder_are_settings() {
        let cfg = parse(&[]).into_config(env).unwrap();
        assert_eq!(cfg.keda_prometheus_url, None);
        assert_eq!(cfg.zero_responder, None, "no POD_IP, no flag: no responder");
        let with_pod_ip = |k: &str| match k {
            "POD_IP" => Some("10.244.1.9".to_owned()),
            _ => env(k),
        };
        let cfg = parse(&["--keda-prometheus-url", "http://prometheus.monitoring:9090"])
            .into_config(with_pod_ip)
            .unwrap();
        assert_eq!(
            cfg.keda_prometheus_url.as_deref(),
            Some("http://prometheus.monitoring:9090")
        );
        assert_eq!(cfg.zero_responder, Some("10.244.1.9:8082".parse().unwrap()));
        let cfg = parse(&[
            "--zero-responder-ip",
            "10.0.0.1",
            "--zero-responder-addr",
            "0.0.0.0:9000",
        ])
        .into_config(with_pod_ip)
        .unwrap();
        assert_eq!(cfg.zero_responder, Some("10.0.0.1:9000".parse().unwrap()));
        let err = parse(&["--keda-prometheus-url", "prometheus:9090"])
            .into_config(env)
            .unwrap_err();
        assert_eq!(err, ConfigError::PrometheusUrl("prometheus:9090".into()));
        let bad_ip = |k: &str| {
            (k == "POD_IP")
                .then(|| "nope".to_owned())
                .or_else(|| env(k))
        };
        assert_eq!(
            parse(&[]).into_config(bad_ip).unwrap_err(),
            ConfigError::PodIp("nope".into())
        );
        assert_eq!(
            parse(&["--zero-retry-after-seconds", "0"])
                .into_config(env)
                .unwrap_err(),
            ConfigError::ZeroRetryAfter
        );
    }

    #[test]
    fn leader_election_can_be_disabled() {
        let cfg = parse(&["--leader-election", "false", "--watch-namespace", "team-a"])
            .into_config(|_| None)
            .unwrap();
        assert_eq!(cfg.leader, None);
        assert_eq!(cfg.watch_namespace.as_deref(), Some("team-a"));
    }

    #[test]
    fn inconsistent_timings_are_rejected() {
        let err = parse(&["--renew-deadline-seconds", "20"])
            .into_config(env)
            .unwrap_err();
        assert_eq!(
            err,
            ConfigError::RenewDeadline {
                renew: 20,
                duration: 15
            }
        );
        let err = parse(&[]).into_config(|_| None).unwrap_err();
        assert_eq!(err, ConfigError::NoLeaseNamespace);
    }
}
