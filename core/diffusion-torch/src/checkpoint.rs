//! Gradient checkpointing over a network's declared segment list: any denoiser (the UNet's
//! resnets and transformers, a DiT's blocks) that describes its forward as a program of
//! [`Segments`] over numbered activation slots runs plainly ([`forward`]) or checkpointed
//! ([`forward_checkpointed`] + [`Tape::backward`]) by the same code.
//!
//! Slots `0..inputs.len()` are the program's inputs; step `k` reads the slots its [`Step`] names
//! and writes slot `inputs.len() + k`; the last step's slot is the output.
//!
//! Why by hand: tch 0.26 exposes neither `torch.utils.checkpoint`, a custom autograd Function nor
//! a tensor hook, so the recomputation cannot run inside autograd's backward. The forward keeps
//! only the slots (no graph) and returns the output as a leaf; after the backward into it,
//! [`Tape::backward`] recomputes each segment in reverse order from detached inputs and
//! back-propagates `⟨y, ∂L/∂y⟩`, whose gradient in every parameter and input of the segment is
//! exactly the chain rule's term; input gradients are summed per slot. A slot read by several
//! segments (a UNet skip) has its complete gradient once every later segment has been processed
//! (reverse program order). Inputs that carry a graph (a context with text-encoder LoRA) get
//! their gradient back-propagated into that graph at the end.
//!
//! Dropout: with `reseed`, libtorch's generator is seeded to `reseed + k` before segment `k` in
//! every mode, so the recomputation draws the forward's masks and the plain forward draws the
//! checkpointed one's. The caller holds whatever lock guards the global generator.

use tch::Tensor;

/// A DiT's joint stream `cat([text, image], 1)` split back into (text, image) by the text
/// slot's shape (`[B, S_txt, D]`, the `shape_of` a block segment is given).
pub fn split_joint(joint: &Tensor, text_shape: Option<&[i64]>) -> (Tensor, Tensor) {
    let n_txt = text_shape.expect("the program passes the text shape")[1];
    (joint.narrow(1, 0, n_txt), joint.narrow(1, n_txt, joint.size()[1] - n_txt))
}

/// One step of a segment program.
#[derive(Clone, Debug)]
pub struct Step<S> {
    /// The network's own name of the segment (what [`Segments::run_segment`] dispatches on).
    pub segment: S,
    /// The slots it reads, in order.
    pub inputs: Vec<usize>,
    /// A slot whose shape (not values) the segment reads, e.g. an upsample's target size.
    pub shape_of: Option<usize>,
}

/// Builds a segment program: step `k` writes slot `first + k` (`first` = the number of input
/// slots), which [`push`](Self::push) returns for later steps to read.
pub struct Program<S> {
    first: usize,
    steps: Vec<Step<S>>,
}

impl<S> Program<S> {
    pub fn new(input_slots: usize) -> Self {
        Program { first: input_slots, steps: Vec::new() }
    }

    /// Appends a step reading `inputs` (and the shape of `shape_of`); returns its output slot.
    pub fn push(&mut self, segment: S, inputs: Vec<usize>, shape_of: Option<usize>) -> usize {
        self.steps.push(Step { segment, inputs, shape_of });
        self.first + self.steps.len() - 1
    }

    pub fn steps(self) -> Vec<Step<S>> {
        self.steps
    }
}

/// A network whose forward is a list of segments (the checkpointing granularity).
pub trait Segments {
    type Segment: Copy;

    /// The program, in execution order.
    fn program(&self) -> Vec<Step<Self::Segment>>;

    /// Runs one segment on its inputs (`shape`: the size of its `shape_of` slot).
    fn run_segment(&self, segment: Self::Segment, x: &[Tensor], shape: Option<Vec<i64>>) -> Tensor;

    /// Whether a segment may hold LoRA weights (conservatively true). A segment that cannot, with
    /// no trainable input, is not recomputed, and its inputs get no gradient autograd would not
    /// compute either.
    fn segment_may_train(&self, _segment: Self::Segment) -> bool {
        true
    }
}

/// Runs step `k` on its input slots (each passed through `input` with its slot number), with
/// the generator reseeded first when `reseed` is given; returns the inputs as passed and the
/// output.
fn run_step<N: Segments>(
    net: &N,
    k: usize,
    step: &Step<N::Segment>,
    slots: &[Option<Tensor>],
    reseed: Option<i64>,
    input: impl Fn(usize, &Tensor) -> Tensor,
) -> (Vec<Tensor>, Tensor) {
    let slot = |s: usize| slots[s].as_ref().expect("a slot is alive while a later step reads it");
    let x: Vec<Tensor> = step.inputs.iter().map(|&s| input(s, slot(s))).collect();
    let shape = step.shape_of.map(|s| slot(s).size());
    if let Some(seed) = reseed {
        tch::manual_seed(seed.wrapping_add(k as i64));
    }
    let y = net.run_segment(step.segment, &x, shape);
    (x, y)
}

/// The plain forward (with a graph where autograd is on), dropping each activation as soon as
/// no later step reads it (autograd keeps what the backward needs; the slots must not keep more).
pub fn forward<N: Segments>(net: &N, inputs: Vec<Tensor>, reseed: Option<i64>) -> Tensor {
    let program = net.program();
    let first = inputs.len();
    let mut last_read = vec![usize::MAX; first + program.len()];
    for (k, step) in program.iter().enumerate() {
        for &s in step.inputs.iter().chain(&step.shape_of) {
            last_read[s] = k;
        }
    }
    let mut slots: Vec<Option<Tensor>> = inputs.into_iter().map(Some).collect();
    for (k, step) in program.iter().enumerate() {
        let (_, y) = run_step(net, k, step, &slots, reseed, |_, t| t.shallow_clone());
        for &s in step.inputs.iter().chain(&step.shape_of) {
            if last_read[s] == k {
                slots[s] = None;
            }
        }
        slots.push(Some(y));
    }
    slots.pop().flatten().expect("a program has at least one step")
}

/// The checkpointed forward: no graph, every slot kept; the returned output is a leaf that
/// requires grad. Back-propagate into it as usual, then call [`Tape::backward`].
pub fn forward_checkpointed<N: Segments>(net: &N, inputs: Vec<Tensor>, reseed: Option<i64>) -> (Tensor, Tape) {
    // Inputs with a graph keep it for their gradient at the end; the slots keep none.
    let graphs: Vec<(usize, Tensor)> =
        inputs.iter().enumerate().filter(|(_, t)| t.requires_grad()).map(|(s, t)| (s, t.shallow_clone())).collect();
    let first = inputs.len();
    let program = net.program();
    let mut slots: Vec<Option<Tensor>> = inputs.into_iter().map(|t| Some(t.detach())).collect();
    tch::no_grad(|| {
        for (k, step) in program.iter().enumerate() {
            let (_, y) = run_step(net, k, step, &slots, reseed, |_, t| t.shallow_clone());
            slots.push(Some(y));
        }
    });
    let out = slots.last().and_then(|o| o.as_ref()).expect("a program has at least one step").set_requires_grad(true);
    (out.shallow_clone(), Tape { slots, first, out, graphs, reseed })
}

/// What [`forward_checkpointed`] keeps for its backward: the activation between every two
/// segments (no graph), the output leaf and the graphs of the inputs that had one.
pub struct Tape {
    slots: Vec<Option<Tensor>>,
    /// The number of input slots (step k writes slot `first + k`).
    first: usize,
    out: Tensor,
    graphs: Vec<(usize, Tensor)>,
    reseed: Option<i64>,
}

impl Tape {
    /// Call after back-propagating into the output. Recomputes each segment in reverse order
    /// with a graph and back-propagates `⟨y, ∂L/∂y⟩`. Nothing happens when the output received
    /// no gradient. Returns the number of segments recomputed (0 or all of them that lead to a
    /// trainable parameter). `net` must be the network that ran the forward.
    pub fn backward<N: Segments>(mut self, net: &N) -> usize {
        let g_out = self.out.grad();
        if !g_out.defined() {
            return 0;
        }
        let program = net.program();
        let trainable = self.trainable(net, &program);
        let mut grads: Vec<Option<Tensor>> = (0..self.slots.len()).map(|_| None).collect();
        *grads.last_mut().expect("an output slot") = Some(g_out);
        let mut recomputed = 0;
        for (k, step) in program.iter().enumerate().rev() {
            let slot = self.first + k;
            self.slots[slot] = None;
            let Some(g) = grads[slot].take() else { continue };
            let (x, y) = tch::with_grad(|| {
                run_step(net, k, step, &self.slots, self.reseed, |s, t| {
                    if trainable[s] {
                        t.detach().set_requires_grad(true)
                    } else {
                        t.detach()
                    }
                })
            });
            if !y.requires_grad() {
                // Nothing trainable upstream of this segment (e.g. a time MLP without LoRA).
                continue;
            }
            tch::with_grad(|| (&y * &g).sum(y.kind()).backward());
            recomputed += 1;
            for (xi, &s) in x.iter().zip(&step.inputs) {
                if !trainable[s] {
                    continue;
                }
                let gi = xi.grad();
                if gi.defined() {
                    grads[s] = Some(match grads[s].take() {
                        Some(acc) => acc + gi,
                        None => gi,
                    });
                }
            }
        }
        for (s, graph) in &self.graphs {
            if let Some(g) = grads[*s].take() {
                tch::with_grad(|| (graph * &g).sum(graph.kind()).backward());
            }
        }
        recomputed
    }

    /// Which slots can carry a gradient to a trainable parameter: inputs with a graph, and
    /// outputs of segments that may train or read such a slot. Without this, e.g. the UNet's
    /// conv_in output would get gradients autograd never computes, at the cost of the first
    /// resnet's input-gradient convolution.
    fn trainable<N: Segments>(&self, net: &N, program: &[Step<N::Segment>]) -> Vec<bool> {
        let mut trainable = vec![false; self.slots.len()];
        for (s, _) in &self.graphs {
            trainable[*s] = true;
        }
        for (k, step) in program.iter().enumerate() {
            trainable[self.first + k] =
                net.segment_may_train(step.segment) || step.inputs.iter().any(|&s| trainable[s]);
        }
        trainable
    }
}
