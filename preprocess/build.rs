//! Builds the libjpeg shim and the fast Huffman decoder against Debian's
//! libjpeg62-turbo-dev. The Huffman decoder uses libjpeg-turbo's internal
//! structures (`jpegint.h`), so `csrc/jpeg_huffman.c` refuses, at compile
//! time, a libjpeg that is not a libjpeg-turbo it was written for.

fn main() {
    println!("cargo:rerun-if-changed=csrc");
    cc::Build::new()
        .file("csrc/jpeg_shim.c")
        .file("csrc/jpeg_huffman.c")
        .warnings(true)
        .compile("flamingo_jpeg_shim");
    println!("cargo:rustc-link-lib=jpeg");
}
