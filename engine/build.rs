//! An rpath to torch's lib/ for the engine's tests (see link_torch.rs).

include!("../torch-shim/link_torch.rs");

fn main() {
    link_torch();
}
