//! Named borrowed inputs as plugins see them.

use abi_stable::std_types::RSlice;
use likeness_abi::{NamedView, TensorView};

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
        self.try_get(name).ok_or_else(|| {
            err::input(format!("missing input `{name}` (got: {})", self.names().join(", ")))
        })
    }

    pub fn len(&self) -> usize {
        self.views.len()
    }

    pub fn is_empty(&self) -> bool {
        self.views.is_empty()
    }
}
