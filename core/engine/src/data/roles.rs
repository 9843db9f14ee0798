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

/// The stem of a declared input name that is a **role pattern**: a name ending in `_*`
/// (`control_*` → `control`); `None` for a plain name. A pattern takes the role equal to its
/// stem and every `<stem>_<n>`, `n` a positive decimal integer without leading zeros
/// (`control`, `control_1`, `control_2`, … as [`control`] names them), so a model declares
/// "any number of control images" without an ABI change (see `likeness_abi::ModelInterface`).
pub fn pattern_stem(name: &str) -> Option<&str> {
    name.strip_suffix("_*").filter(|s| !s.is_empty() && !s.contains('*'))
}

/// The position of `role` among the roles of the pattern with `stem`: 0 for the stem itself,
/// `n` for `<stem>_<n>`; `None` when it does not match. Leading zeros do not match, so each
/// position has one spelling and `control_01` is not a second `control_1`.
pub fn pattern_index(stem: &str, role: &str) -> Option<u64> {
    if role == stem {
        return Some(0);
    }
    let n = role.strip_prefix(stem)?.strip_prefix('_')?;
    if n.is_empty() || n.starts_with('0') || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// The roles among `roles` that the declared input `name` takes, in the order they are passed:
/// for a plain name the role of that name (if present), for a pattern every matching role by
/// position (`control`, `control_1`, `control_2`, …).
pub fn matching<'r>(name: &str, roles: impl IntoIterator<Item = &'r str>) -> Vec<&'r str> {
    match pattern_stem(name) {
        None => roles.into_iter().filter(|r| *r == name).take(1).collect(),
        Some(stem) => {
            let mut m: Vec<(u64, &str)> =
                roles.into_iter().filter_map(|r| Some((pattern_index(stem, r)?, r))).collect();
            m.sort();
            m.dedup();
            m.into_iter().map(|(_, r)| r).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_patterns_take_the_stem_and_numbered_roles_in_order() {
        assert_eq!(pattern_stem("control_*"), Some("control"));
        assert_eq!(pattern_stem("control"), None);
        assert_eq!(pattern_stem("_*"), None);
        assert_eq!(pattern_stem("a*_*"), None);
        let roles =
            ["target", "control_10", "reference", "control_2", "control", "control_1", "controls", "control_01"];
        assert_eq!(matching("control_*", roles), vec!["control", "control_1", "control_2", "control_10"]);
        assert_eq!(matching("control", roles), vec!["control"]);
        assert_eq!(matching("control_2", roles), vec!["control_2"]);
        assert!(matching("mask_*", roles).is_empty());
        for bad in ["control_", "control_x", "control_1_2", "control_-1", "control_0", "control_+1", "controls"] {
            assert_eq!(pattern_index("control", bad), None, "{bad}");
        }
        // The names the datasets write are exactly the ones a pattern takes.
        for k in 0..12 {
            assert_eq!(pattern_index("control", &control(k)), Some(k as u64));
        }
    }
}
