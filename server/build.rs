//! With the `torch` feature, embeds an rpath to the libtorch the server was
//! built against, so `target/release/hndsr-server` and the test binaries run
//! without `LD_LIBRARY_PATH`. torch-sys (`links = "tch"`) exports its library
//! directory to direct dependents as `DEP_TCH_LIBTORCH_LIB`. A GPU node's own
//! libtorch on `LD_LIBRARY_PATH` still takes precedence over the RUNPATH.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_TORCH").is_none() {
        return;
    }
    if let Some(dir) = std::env::var_os("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.to_string_lossy());
    }
}
