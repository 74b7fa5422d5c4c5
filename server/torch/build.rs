//! Embeds an rpath to the libtorch this crate was built against, so the
//! crate's own test binaries run without `LD_LIBRARY_PATH`.
//!
//! torch-sys (`links = "tch"`) exports its library directory to direct
//! dependents as `DEP_TCH_LIBTORCH_LIB`. On a machine with its own libtorch
//! (the GPU nodes), `LD_LIBRARY_PATH` still takes precedence over a RUNPATH.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-changed=build.rs");
    if let Some(dir) = std::env::var_os("DEP_TCH_LIBTORCH_LIB") {
        let dir = dir.to_string_lossy();
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        // Lets the CUDA loader fall back to the build-time directory.
        println!("cargo:rustc-env=HNDSR_TORCH_BUILD_LIBDIR={dir}");
    }
}
