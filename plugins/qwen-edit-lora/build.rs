// Finds libtorch at dlopen time with no environment variables: see the shared file.
include!("../../core/sdk-torch/build_support/rpath.rs");

fn main() {
    link_libtorch_with_rpath()
}
