//! Role names: every example names its images and texts by role (the table in the module docs
//! of [`crate::data`] says which file of each layout plays which role).

pub const TARGET: &str = "target";
pub const REFERENCE: &str = "reference";
pub const CONTROL: &str = "control";
pub const CAPTION: &str = "caption";
pub const ATTRIBUTE: &str = "attribute";

/// `control` for the first control image, then `control_1`, `control_2`, … (musubi-tuner's
/// `control_0`, `control_1`, …).
pub fn control(i: usize) -> String {
    if i == 0 {
        CONTROL.to_string()
    } else {
        format!("{CONTROL}_{i}")
    }
}
