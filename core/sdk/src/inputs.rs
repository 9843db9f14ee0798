//! Named borrowed inputs as plugins see them.

use abi_stable::std_types::RSlice;
use likeness_abi::{NamedTexts, NamedView, TensorView};

use crate::err;

/// The named views of one call. Borrowed: valid until the method returns.
#[derive(Clone, Copy)]
pub struct Inputs<'a> {
    views: RSlice<'a, NamedView<'a>>,
}

impl<'a> Inputs<'a> {
    pub fn new(views: RSlice<'a, NamedView<'a>>) -> Self {
        Inputs { views }
    }

    pub fn names(&self) -> Vec<&'a str> {
        self.views.iter().map(|v| v.name.as_str()).collect()
    }

    pub fn try_get(&self, name: &str) -> Option<&'a TensorView> {
        self.views.as_slice().iter().find(|v| v.name.as_str() == name).map(|v| &v.view)
    }

    /// The view called `name`, or an `InvalidInput` error listing what was passed.
    pub fn get(&self, name: &str) -> crate::Result<&'a TensorView> {
        self.try_get(name)
            .ok_or_else(|| err::input(format!("missing input `{name}` (got: {})", self.names().join(", "))))
    }

    pub fn len(&self) -> usize {
        self.views.len()
    }

    pub fn is_empty(&self) -> bool {
        self.views.is_empty()
    }
}

/// The named text batches of one call (prompts, captions). Borrowed: valid until the method
/// returns.
#[derive(Clone, Copy)]
pub struct Texts<'a> {
    texts: RSlice<'a, NamedTexts<'a>>,
}

impl<'a> Texts<'a> {
    pub fn new(texts: RSlice<'a, NamedTexts<'a>>) -> Self {
        Texts { texts }
    }

    /// No texts (what a 1.0 host, or a call without texts, passes).
    pub fn none() -> Texts<'static> {
        Texts { texts: RSlice::from_slice(&[]) }
    }

    pub fn names(&self) -> Vec<&'a str> {
        self.texts.iter().map(|t| t.name.as_str()).collect()
    }

    pub fn try_get(&self, name: &str) -> Option<Vec<&'a str>> {
        let t = self.texts.as_slice().iter().find(|t| t.name.as_str() == name)?;
        Some(t.texts.as_slice().iter().map(|s| s.as_str()).collect())
    }

    /// The batch called `name`, or an `InvalidInput` error listing what was passed.
    pub fn get(&self, name: &str) -> crate::Result<Vec<&'a str>> {
        self.try_get(name)
            .ok_or_else(|| err::input(format!("missing text input `{name}` (got: {})", self.names().join(", "))))
    }

    pub fn is_empty(&self) -> bool {
        self.texts.is_empty()
    }
}
