// Bakes libtorch's folder into the plugin's rpath so the host can open it with no
// LD_LIBRARY_PATH: the SDK's shared build helper, included from the SDK checkout.
include!(@RPATH_RS@);

fn main() {
    link_libtorch_with_rpath()
}
