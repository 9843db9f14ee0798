//! P-, R- and O-Net (facenet-pytorch's `PNet`/`RNet`/`ONet` layer layout and state-dict names),
//! as plain functional tch over the loaded tensors: inference only, no autograd state.

use std::collections::HashMap;
use std::path::Path;

use tch::{Kind, Tensor};

use crate::MtcnnError;

/// One network's tensors by state-dict name.
pub struct Weights {
    file: String,
    map: HashMap<String, Tensor>,
}

impl Weights {
    /// Checks that every expected name is present with the expected shape, so a wrong or
    /// truncated file fails here with its name rather than inside a convolution.
    pub fn new(file: &Path, tensors: Vec<(String, Tensor)>, expected: &[(&str, &[i64])]) -> Result<Self, MtcnnError> {
        let file_s = file.display().to_string();
        let map: HashMap<String, Tensor> = tensors.into_iter().map(|(k, v)| (k, v.to_kind(Kind::Float))).collect();
        for (name, shape) in expected {
            match map.get(*name) {
                None => {
                    return Err(MtcnnError::Weights {
                        file: file_s,
                        msg: format!("tensor `{name}` is missing (is this facenet-pytorch's MTCNN file?)"),
                    })
                }
                Some(t) if t.size() != *shape => {
                    return Err(MtcnnError::Weights {
                        file: file_s,
                        msg: format!("tensor `{name}` has shape {:?}, expected {:?}", t.size(), shape),
                    })
                }
                Some(_) => {}
            }
        }
        Ok(Weights { file: file_s, map })
    }

    fn t(&self, name: &str) -> &Tensor {
        // `new` checked every name the forward passes use.
        self.map.get(name).unwrap_or_else(|| panic!("{}: `{name}` checked at load", self.file))
    }

    fn into_device(self, d: tch::Device) -> Self {
        Weights { file: self.file, map: self.map.into_iter().map(|(k, v)| (k, v.to_device(d))).collect() }
    }

    fn conv(&self, x: &Tensor, name: &str) -> Tensor {
        x.conv2d(self.t(&format!("{name}.weight")), Some(self.t(&format!("{name}.bias"))), [1, 1], [0, 0], [1, 1], 1)
    }

    fn prelu(&self, x: &Tensor, name: &str) -> Tensor {
        x.prelu(self.t(&format!("{name}.weight")))
    }

    fn linear(&self, x: &Tensor, name: &str) -> Tensor {
        x.linear(self.t(&format!("{name}.weight")), Some(self.t(&format!("{name}.bias"))))
    }
}

fn pool(x: &Tensor, k: i64, s: i64) -> Tensor {
    // nn.MaxPool2d(k, s, ceil_mode=True)
    x.max_pool2d([k, k], [s, s], [0, 0], [1, 1], true)
}

pub const PNET: &[(&str, &[i64])] = &[
    ("conv1.weight", &[10, 3, 3, 3]),
    ("conv1.bias", &[10]),
    ("prelu1.weight", &[10]),
    ("conv2.weight", &[16, 10, 3, 3]),
    ("conv2.bias", &[16]),
    ("prelu2.weight", &[16]),
    ("conv3.weight", &[32, 16, 3, 3]),
    ("conv3.bias", &[32]),
    ("prelu3.weight", &[32]),
    ("conv4_1.weight", &[2, 32, 1, 1]),
    ("conv4_1.bias", &[2]),
    ("conv4_2.weight", &[4, 32, 1, 1]),
    ("conv4_2.bias", &[4]),
];

pub const RNET: &[(&str, &[i64])] = &[
    ("conv1.weight", &[28, 3, 3, 3]),
    ("conv1.bias", &[28]),
    ("prelu1.weight", &[28]),
    ("conv2.weight", &[48, 28, 3, 3]),
    ("conv2.bias", &[48]),
    ("prelu2.weight", &[48]),
    ("conv3.weight", &[64, 48, 2, 2]),
    ("conv3.bias", &[64]),
    ("prelu3.weight", &[64]),
    ("dense4.weight", &[128, 576]),
    ("dense4.bias", &[128]),
    ("prelu4.weight", &[128]),
    ("dense5_1.weight", &[2, 128]),
    ("dense5_1.bias", &[2]),
    ("dense5_2.weight", &[4, 128]),
    ("dense5_2.bias", &[4]),
];

pub const ONET: &[(&str, &[i64])] = &[
    ("conv1.weight", &[32, 3, 3, 3]),
    ("conv1.bias", &[32]),
    ("prelu1.weight", &[32]),
    ("conv2.weight", &[64, 32, 3, 3]),
    ("conv2.bias", &[64]),
    ("prelu2.weight", &[64]),
    ("conv3.weight", &[64, 64, 3, 3]),
    ("conv3.bias", &[64]),
    ("prelu3.weight", &[64]),
    ("conv4.weight", &[128, 64, 2, 2]),
    ("conv4.bias", &[128]),
    ("prelu4.weight", &[128]),
    ("dense5.weight", &[256, 1152]),
    ("dense5.bias", &[256]),
    ("prelu5.weight", &[256]),
    ("dense6_1.weight", &[2, 256]),
    ("dense6_1.bias", &[2]),
    ("dense6_2.weight", &[4, 256]),
    ("dense6_2.bias", &[4]),
    ("dense6_3.weight", &[10, 256]),
    ("dense6_3.bias", &[10]),
];

/// The three networks.
pub struct Nets {
    pub pnet: Weights,
    pub rnet: Weights,
    pub onet: Weights,
}

impl Nets {
    pub fn into_device(self, d: tch::Device) -> Self {
        Nets { pnet: self.pnet.into_device(d), rnet: self.rnet.into_device(d), onet: self.onet.into_device(d) }
    }

    /// `[N, 3, h, w]` normalised → (box regression `[N, 4, h', w']`, face probability `[N, 2, h', w']`).
    pub fn pnet(&self, x: &Tensor) -> (Tensor, Tensor) {
        let w = &self.pnet;
        let x = pool(&w.prelu(&w.conv(x, "conv1"), "prelu1"), 2, 2);
        let x = w.prelu(&w.conv(&x, "conv2"), "prelu2");
        let x = w.prelu(&w.conv(&x, "conv3"), "prelu3");
        let a = w.conv(&x, "conv4_1").softmax(1, Kind::Float);
        (w.conv(&x, "conv4_2"), a)
    }

    /// `[N, 3, 24, 24]` → (regression `[N, 4]`, probability `[N, 2]`).
    pub fn rnet(&self, x: &Tensor) -> (Tensor, Tensor) {
        let w = &self.rnet;
        let x = pool(&w.prelu(&w.conv(x, "conv1"), "prelu1"), 3, 2);
        let x = pool(&w.prelu(&w.conv(&x, "conv2"), "prelu2"), 3, 2);
        let x = w.prelu(&w.conv(&x, "conv3"), "prelu3");
        // The dense layer was converted from Caffe/TF weights laid out as (W, H, C): the same
        // permute as facenet-pytorch before flattening.
        let x = x.permute([0, 3, 2, 1]).contiguous();
        let n = x.size()[0];
        let x = w.prelu(&w.linear(&x.view([n, -1]), "dense4"), "prelu4");
        (w.linear(&x, "dense5_2"), w.linear(&x, "dense5_1").softmax(1, Kind::Float))
    }

    /// `[N, 3, 48, 48]` → (regression `[N, 4]`, landmarks `[N, 10]`, probability `[N, 2]`).
    pub fn onet(&self, x: &Tensor) -> (Tensor, Tensor, Tensor) {
        let w = &self.onet;
        let x = pool(&w.prelu(&w.conv(x, "conv1"), "prelu1"), 3, 2);
        let x = pool(&w.prelu(&w.conv(&x, "conv2"), "prelu2"), 3, 2);
        let x = pool(&w.prelu(&w.conv(&x, "conv3"), "prelu3"), 2, 2);
        let x = w.prelu(&w.conv(&x, "conv4"), "prelu4");
        let x = x.permute([0, 3, 2, 1]).contiguous();
        let n = x.size()[0];
        let x = w.prelu(&w.linear(&x.view([n, -1]), "dense5"), "prelu5");
        (w.linear(&x, "dense6_2"), w.linear(&x, "dense6_3"), w.linear(&x, "dense6_1").softmax(1, Kind::Float))
    }
}
