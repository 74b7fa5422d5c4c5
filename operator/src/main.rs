//! `hndsr-operator`: start-up checks, watch caches, leader election, the
//! controller, the metrics/probe server and graceful shutdown.

use std::{
    process::ExitCode,
    sync::{Arc, atomic::Ordering},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use futures::StreamExt;
use hndsr_crds::HndsrService;
use hndsr_operator::{
    builders::BuildConfig,
    config::{Args, Config},
    context::{self, Context},
    controller::{error_policy, reconcile},
    http::{self, HttpState},
    leader::LeaderElector,
    slim,
    watches::{self, Triggers},
    zero::{self, ZeroResponder},
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api, Client, CustomResourceExt,
    runtime::{Controller, WatchStreamExt, controller, reflector, watcher},
};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    let config = match Args::parse().into_config(|k| std::env::var(k).ok()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("hndsr-operator: {error}");
            return ExitCode::from(2);
        }
    };
    init_tracing(config.log_json);
    // Explicit, because which rustls providers are compiled in depends on
    // what else is in the build (see Cargo.toml). Err only if one is set already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line with the whole cause chain, in the log format in use.
            tracing::error!(error = format!("{error:#}"), "hndsr-operator failed");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Fails with an actionable message when the CRD is missing.
async fn check_crd(client: Client) -> anyhow::Result<()> {
    let name = HndsrService::crd_name();
    let crds: Api<CustomResourceDefinition> = Api::all(client);
    match crds.get_opt(name).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => bail!(
            "the HndsrService CRD is not installed: kubectl apply -f crds/hndsrservice.yaml (or install the Helm chart)"
        ),
        Err(e) => Err(e).with_context(|| format!("reading CustomResourceDefinition {name}")),
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    check_crd(client.clone()).await?;

    let shutdown = CancellationToken::new();
    tokio::spawn(signal_shutdown(shutdown.clone()));

    let state = HttpState::default();
    let metrics = state.metrics.clone();
    let listener = tokio::net::TcpListener::bind(config.metrics_addr)
        .await
        .with_context(|| format!("binding the metrics address {}", config.metrics_addr))?;
    let http_task = tokio::spawn(http::serve(listener, state.clone(), {
        let s = shutdown.clone();
        async move { s.cancelled().await }
    }));

    // Every replica answers at zero (the Services point at the leader's).
    let zero = ZeroResponder::new(
        &metrics,
        &config.cluster_domain,
        config.zero_retry_after_seconds,
    );
    let zero_listener = tokio::net::TcpListener::bind(config.zero_responder_addr)
        .await
        .with_context(|| {
            format!(
                "binding the zero responder address {}",
                config.zero_responder_addr
            )
        })?;
    tracing::info!(addr = %config.zero_responder_addr, advertised = ?config.zero_responder, "serving the zero responder");
    let zero_task = tokio::spawn({
        let (router, s) = (zero::router(zero.clone()), shutdown.clone());
        async move {
            axum::serve(zero_listener, router)
                .with_graceful_shutdown(async move { s.cancelled().await })
                .await
        }
    });

    // Caches run in every replica; triggers flow only while leading.
    let (tx, rx) = futures::channel::mpsc::unbounded();
    let triggers = Triggers {
        leading: Arc::default(),
        tx,
    };
    let ns = config.watch_namespace.as_deref();
    let w = watches::watches(&client, ns, &triggers);
    for driver in w.drivers {
        tokio::spawn(driver);
    }
    let stores = w.stores;
    {
        let (stores, ready) = (stores.clone(), state.ready.clone());
        tokio::spawn(async move {
            stores.wait_synced().await;
            ready.store(true, Ordering::Release);
            tracing::info!("watch caches synced");
        });
    }

    // Leadership.
    let elector = config
        .leader
        .clone()
        .map(|cfg| LeaderElector::new(client.clone(), cfg));
    let mut elector_task = None;
    if let Some(elector) = &elector {
        let (leading_tx, mut leading_rx) = tokio::sync::watch::channel(false);
        let (elector2, metrics2, stop) = (elector.clone(), metrics.clone(), shutdown.clone());
        elector_task = Some(tokio::spawn(async move {
            let lost = elector2.run(leading_tx, metrics2).await;
            if stop.is_cancelled() {
                return;
            }
            // See leader.rs: restarting is the simplest way to be sure no
            // reconcile of the old term writes after another replica took over.
            tracing::error!(error = %lost, "leadership lost; exiting so the kubelet restarts this replica");
            std::process::exit(1);
        }));
        tracing::info!("waiting for leadership");
        tokio::select! {
            _ = leading_rx.wait_for(|l| *l) => {}
            () = shutdown.cancelled() => {
                http_task.await.ok();
                return Ok(());
            }
        }
    } else {
        metrics.leader.set(1);
    }
    // Reconcile only from complete caches: a pass over a half-listed pod
    // cache would see running pods as missing and rewrite their status.
    tokio::select! {
        () = stores.wait_synced() => {}
        () = shutdown.cancelled() => {
            http_task.await.ok();
            return Ok(());
        }
    }
    triggers.leading.store(true, Ordering::Release);

    let ctx = Context::new(
        client.clone(),
        &config.identity,
        metrics,
        stores,
        BuildConfig {
            log_json: config.log_json,
            fetcher_image: config.fetcher_image.clone(),
            placeholder_priority_class: config.placeholder_priority_class.clone(),
            cluster_domain: config.cluster_domain.clone(),
            keda_prometheus_url: config.keda_prometheus_url.clone(),
            zero_responder: config.zero_responder,
        },
        zero,
    );
    let hsvc: Api<HndsrService> = watches::scoped_api(client.clone(), ns);
    tracing::info!(namespace = ns.unwrap_or("<all>"), "starting the controller");
    // `Controller::new`, with the cache trimmed to what a reconcile reads.
    let (reader, writer) = reflector::store();
    let trigger = watcher(hsvc, watches::list_config())
        .default_backoff()
        .modify(slim::hndsr_service)
        .reflect(writer)
        .applied_objects();
    Controller::for_stream(trigger, reader)
        .with_config(controller::Config::default().concurrency(16))
        .reconcile_on(rx)
        .graceful_shutdown_on({
            let s = shutdown.clone();
            async move { s.cancelled_owned().await }
        })
        .run(reconcile, error_policy, Arc::clone(&ctx))
        .for_each(|res| {
            let ctx = Arc::clone(&ctx);
            async move {
                match res {
                    Ok((obj, _)) => {
                        tracing::debug!(name = %obj.name, namespace = ?obj.namespace, "reconciled")
                    }
                    Err(controller::Error::ReconcilerFailed(..)) => {} // logged by reconcile
                    // A retry came due for an object deleted meanwhile.
                    Err(controller::Error::ObjectNotFound(gone)) => {
                        ctx.backoff.forget_deleted(&gone);
                        ctx.written.forget(&context::typed(&gone));
                        tracing::debug!(name = %gone.name, namespace = ?gone.namespace, "gone before its retry");
                    }
                    Err(error) => tracing::warn!(%error, "controller"),
                }
            }
        })
        .await;

    tracing::info!("controller stopped; releasing the lease");
    // Stop renewing first, or the next round would take the released Lease again.
    if let Some(task) = elector_task {
        task.abort();
        let _ = task.await;
    }
    if let Some(elector) = &elector
        && let Err(error) = elector.release().await
    {
        tracing::warn!(%error, "releasing the lease failed; the other replica takes over at expiry");
    }
    http_task.await.ok();
    zero_task.await.ok();
    Ok(())
}

/// Cancels `token` on SIGTERM or Ctrl-C.
async fn signal_shutdown(token: CancellationToken) {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
    tracing::info!("shutdown requested: finishing in-flight reconciles");
    token.cancel();
}
