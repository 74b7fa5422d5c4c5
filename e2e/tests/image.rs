//! The server image on its own: `podman run` with a read-only root
//! filesystem as a non-root user, then `/readyz` 200 and an upscale that is
//! the right size and consistent with its input; and its second weights,
//! for realistic inputs (`make images` first).

use std::process::{Command, Stdio};
use std::time::Duration;

use hndsr_e2e::process::{free_port, http_get};
use hndsr_e2e::{bins, wait};

const SAMPLE: &str = "docs/samples/nile-256.png";

fn engine() -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(bins::repo_root().join("images/engine.sh"))
        .current_dir(bins::repo_root());
    cmd
}

fn server_image() -> anyhow::Result<String> {
    let out = Command::new("bash")
        .arg(bins::repo_root().join("images/build.sh"))
        .arg("names")
        .output()?;
    String::from_utf8(out.stdout)?
        .lines()
        .next()
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("images/build.sh names printed nothing"))
}

/// Removes the container however the test ends.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = engine()
            .args(["rm", "-f", "-t", "5", &self.0])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// PSNR (dB) of `a` against `b`, 8-bit RGB of the same size.
fn psnr(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    let mse = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum::<f64>()
        / a.as_raw().len() as f64;
    10.0 * (255.0f64.powi(2) / mse.max(1e-12)).log10()
}

/// Runs the server image read-only on the host network with `env` on top
/// of its own; returns the container (removed on drop) and its address
/// once `/readyz` answers 200.
async fn start(image: &str, env: &[String]) -> anyhow::Result<(Container, String)> {
    let inspect = engine().args(["image", "inspect", image]).output()?;
    anyhow::ensure!(
        inspect.status.success(),
        "image {image} not found: build it with `make images`"
    );
    let port = free_port()?;
    let name = format!("hndsr-image-test-{port}");
    let mut run = engine();
    // Host network: no port mapping (and no host firewall rules) needed.
    run.args([
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        "host",
        "--read-only",
        "--tmpfs",
        "/tmp",
    ])
    .args([
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=4096:4096",
    ])
    .arg("-e")
    .arg(format!("HNDSR_LISTEN_ADDR=127.0.0.1:{port}"));
    for e in env {
        run.arg("-e").arg(e);
    }
    let run = run.arg(image).output()?;
    anyhow::ensure!(
        run.status.success(),
        "podman run failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let container = Container(name);
    let addr = format!("127.0.0.1:{port}");
    wait::until(
        "/readyz 200 from the container",
        Duration::from_secs(120),
        || async {
            Ok::<_, std::convert::Infallible>(
                http_get(&addr, "/readyz")
                    .await
                    .filter(|(status, _)| *status == 200)
                    .map(|_| ()),
            )
        },
    )
    .await?;
    Ok((container, addr))
}

/// POSTs the sample to `addr` with curl; the decoded answer.
fn upscale_sample(addr: &str) -> anyhow::Result<image::RgbImage> {
    let body = std::fs::read(bins::repo_root().join(SAMPLE))?;
    let client = Command::new("curl")
        .args([
            "-s",
            "-f",
            "--data-binary",
            "@-",
            "-H",
            "content-type: image/png",
        ])
        .arg(format!("http://{addr}/v1/upscale?scale=4"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let answer = {
        use std::io::Write;
        let mut client = client;
        client.stdin.take().expect("piped").write_all(&body)?;
        client.wait_with_output()?
    };
    anyhow::ensure!(answer.status.success(), "the upscale request failed");
    Ok(image::load_from_memory(&answer.stdout)?.to_rgb8())
}

#[tokio::test]
async fn the_server_image_serves_a_correct_upscale_read_only_and_non_root() -> anyhow::Result<()> {
    let image = server_image()?;
    let (container, addr) = start(&image, &[]).await?;
    let name = container.0.clone();

    let user = engine().args(["exec", &name, "id", "-u"]).output()?;
    assert_eq!(String::from_utf8_lossy(&user.stdout).trim(), "65532");
    let write = engine()
        .args(["exec", &name, "touch", "/usr/local/bin/x"])
        .output()?;
    assert!(
        !write.status.success(),
        "the root filesystem must be read-only"
    );

    let input = image::open(bins::repo_root().join(SAMPLE))?.to_rgb8();
    let output = upscale_sample(&addr)?;
    assert_eq!(output.dimensions(), (input.width() * 4, input.height() * 4));
    // A super-resolved image, averaged back down ×4, is close to its input.
    let down = image::imageops::resize(
        &output,
        input.width(),
        input.height(),
        image::imageops::FilterType::Triangle,
    );
    let db = psnr(&down, &input);
    assert!(db > 30.0, "output ↓4 vs input: {db:.1} dB");
    Ok(())
}

/// The weights for realistic inputs ship in the same image, where the
/// operator points `profile: realistic` pods (`hndsr_contract::bundled`).
#[tokio::test]
async fn the_server_image_serves_its_realistic_weights() -> anyhow::Result<()> {
    let image = server_image()?;
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        bins::repo_root().join("server/models/hndsr-realistic.json"),
    )?)?;
    let sha256 = manifest["sha256"].as_str().expect("sha256 in the manifest");
    let (_container, addr) = start(
        &image,
        &[
            "HNDSR_WEIGHTS_PATH=/opt/hndsr/models/hndsr-realistic.safetensors".to_owned(),
            format!("HNDSR_WEIGHTS_SHA256={sha256}"),
        ],
    )
    .await?;
    let (status, body) = http_get(&addr, "/v1/info")
        .await
        .ok_or_else(|| anyhow::anyhow!("no answer from /v1/info"))?;
    assert_eq!(status, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(info["profile"], "realistic", "the weights pick it: {info}");
    assert_eq!(info["model_digest"], sha256, "{info}");
    assert_eq!(info["projection_steps"], 0, "{info}");
    let input = image::open(bins::repo_root().join(SAMPLE))?;
    let output = upscale_sample(&addr)?;
    assert_eq!(output.dimensions(), (input.width() * 4, input.height() * 4));
    Ok(())
}
