//! LoRA key maps (kohya / diffusers / PEFT / ComfyUI). Not implemented yet: every entry point
//! returns [`DiffusionError::NotImplemented`] so no caller mistakes it for a working converter.

use crate::{DiffusionError, Result};

/// The LoRA file formats the converters will name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraFormat {
    Kohya,
    Diffusers,
    Peft,
    ComfyUi,
}

/// Maps one key between formats. Not implemented yet (issue 8 part 1, left for a follow-up).
pub fn convert_key(_key: &str, _from: LoraFormat, _to: LoraFormat) -> Result<String> {
    Err(DiffusionError::NotImplemented("LoRA key maps (kohya/diffusers/peft/comfyui) are not written yet"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn convert_key_fails_loudly() {
        let e = convert_key("lora_unet_x.lora_down.weight", LoraFormat::Kohya, LoraFormat::Peft).unwrap_err();
        assert!(e.to_string().contains("not implemented"), "{e}");
    }
}
