//! Embeds torch's lib/ as an rpath so tests and binaries run without
//! LD_LIBRARY_PATH (torch-sys exports the folder it linked against), and
//! builds the libjpeg shim (Debian's libjpeg62-turbo-dev).

fn main() {
    if let Ok(torch_lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{torch_lib}");
    }
    println!("cargo:rerun-if-changed=csrc");
    cc::Build::new()
        .file("csrc/jpeg_shim.c")
        .file("csrc/jpeg_huffman.c")
        .warnings(true)
        .compile("flamingo_jpeg_shim");
    println!("cargo:rustc-link-lib=jpeg");
}
