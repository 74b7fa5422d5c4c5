//! Writes the `HndsrService` CRD YAML and its Markdown reference.
//!
//! `crdgen --out crds/hndsrservice.yaml --chart-out charts/hndsr-operator/crds/hndsrservice.yaml
//! --reference-out docs/crd-reference.md`; with no flag the YAML goes to stdout.
//! The output is deterministic so CI can fail on drift.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Parser;
use hndsr_crds::{HndsrService, reference};
use kube::CustomResourceExt as _;

/// Generate the HndsrService CRD and its reference.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Write the CRD YAML here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also write the CRD YAML here (the Helm chart's copy).
    #[arg(long)]
    chart_out: Option<PathBuf>,
    /// Write the Markdown reference here.
    #[arg(long)]
    reference_out: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let yaml = hndsr_crds::crd_yaml().context("serializing the CRD")?;
    if args.out.is_none() && args.chart_out.is_none() && args.reference_out.is_none() {
        print!("{yaml}");
        return Ok(());
    }
    for path in [&args.out, &args.chart_out].into_iter().flatten() {
        write(path, &yaml)?;
    }
    if let Some(path) = &args.reference_out {
        write(path, &reference::markdown(&HndsrService::crd()))?;
    }
    Ok(())
}

fn write(path: &Path, contents: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}
