//! The privileged teacher: the same model, its context extended by a privileged block (a
//! rationale), scoring the student's sampled response.
//!
//! The teacher prompt is longer than the student's, so positions are aligned *by position
//! within the response*: both models are teacher-forced on the same response tokens through
//! [`PolicyModel::response_hidden`], and row `r` of either result is the state that predicts
//! response token `r`. The teacher runs on the inner (non-autodiff) backend, so it never
//! records a graph and never receives gradients.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::container::TensorContainer;
use burn::tensor::{Int, Tensor};

use crate::fused::TeacherInput;
use crate::model::PolicyModel;

/// How the caller turns a student context into the teacher's: student context + privileged
/// block, in whatever layout the chat template wants (typically the rationale goes into the
/// user turn, before the assistant header, so the response starts at the same place
/// relative to the template).
///
/// ```
/// use omniopsd_core::teacher::PrivilegedTemplate;
///
/// /// Token-id prompts whose last `suffix` tokens are the assistant header.
/// struct BeforeHeader { suffix: usize }
///
/// impl PrivilegedTemplate<Vec<u32>> for BeforeHeader {
///     type Block = [u32];
///     fn teacher_prompt(&self, student: &Vec<u32>, block: &[u32]) -> Vec<u32> {
///         let cut = student.len().saturating_sub(self.suffix);
///         let mut out = student[..cut].to_vec();
///         out.extend_from_slice(block);
///         out.extend_from_slice(&student[cut..]);
///         out
///     }
/// }
///
/// let t = BeforeHeader { suffix: 1 }.teacher_prompt(&vec![1, 2, 9], &[7, 7]);
/// assert_eq!(t, vec![1, 2, 7, 7, 9]);
/// ```
pub trait PrivilegedTemplate<P> {
    /// The privileged information (e.g. rationale token ids).
    type Block: ?Sized;

    /// The teacher's context for `student`, given `block`.
    fn teacher_prompt(&self, student: &P, block: &Self::Block) -> P;
}

/// Which weights the teacher uses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TeacherMode {
    /// A snapshot `θ₀` of the weights taken when training starts; never changes.
    Frozen,
    /// An exponential moving average of the student's weights: after every optimizer update,
    /// `θ_T ← (1 − rate)·θ_T + rate·θ_S` (`rate` in `(0, 1]`; `rate = 1` is `Live` one
    /// update late). Starts at `θ₀`.
    Ema {
        /// Weight of the current student in each blend.
        rate: f32,
    },
    /// The current student weights, detached (OPSD's default self-teacher).
    Live,
}

impl Default for TeacherMode {
    fn default() -> Self {
        Self::Live
    }
}

impl TeacherError {
    /// The out-of-range field of a [`TeacherMode`] (`rate`), if this is a config error.
    pub fn field_error(&self) -> Option<crate::FieldError> {
        match self {
            Self::Rate { found } => Some(crate::FieldError::new(
                "rate",
                format!("must be in (0, 1], found {found}"),
            )),
            _ => None,
        }
    }
}

impl TeacherMode {
    /// Checks `rate` in `(0, 1]` for [`TeacherMode::Ema`].
    pub fn validate(&self) -> Result<(), TeacherError> {
        match *self {
            Self::Ema { rate } if !(rate > 0.0 && rate <= 1.0) => {
                Err(TeacherError::Rate { found: rate })
            }
            _ => Ok(()),
        }
    }

    /// Whether the mode keeps its own copy of the weights.
    pub fn has_snapshot(&self) -> bool {
        !matches!(self, Self::Live)
    }
}

/// Errors of teacher handling.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TeacherError {
    /// EMA rate out of range.
    #[error("teacher mode ema: `rate` must be in (0, 1], found {found}")]
    Rate {
        /// The rate found.
        found: f32,
    },
    /// A snapshot was given for `Live`, or none for `Frozen`/`Ema`.
    #[error("teacher mode {mode}: snapshot expected {expected}, found {found}")]
    Snapshot {
        /// The mode's name.
        mode: &'static str,
        /// `present` or `absent`.
        expected: &'static str,
        /// `present` or `absent`.
        found: &'static str,
    },
    /// The student has a parameter the teacher snapshot lacks, or the other way round.
    #[error("EMA blend: parameter {param} is in the {present} but not in the {absent}")]
    ParamMismatch {
        /// The parameter id.
        param: String,
        /// Which module has it.
        present: &'static str,
        /// Which module lacks it.
        absent: &'static str,
    },
    /// Teacher hidden states and LM head disagree with the response.
    #[error("teacher scoring: `{tensor}` expected shape {expected:?}, found {found:?}")]
    Shape {
        /// Which tensor.
        tensor: &'static str,
        /// Expected dimensions.
        expected: Vec<usize>,
        /// Dimensions found.
        found: Vec<usize>,
    },
}

/// The teacher's weights: nothing for [`TeacherMode::Live`] (the caller's current model is
/// used), a snapshot otherwise.
#[derive(Clone, Debug)]
pub struct Teacher<M> {
    mode: TeacherMode,
    snapshot: Option<M>,
}

impl<M: Clone> Teacher<M> {
    /// Starts a teacher from the student's current weights `θ₀`.
    pub fn new(mode: TeacherMode, student: &M) -> Result<Self, TeacherError> {
        mode.validate()?;
        Ok(Self {
            mode,
            snapshot: mode.has_snapshot().then(|| student.clone()),
        })
    }

    /// Restores a teacher from a saved snapshot (see [`Teacher::snapshot`]).
    pub fn from_snapshot(mode: TeacherMode, snapshot: Option<M>) -> Result<Self, TeacherError> {
        mode.validate()?;
        let presence = |p: bool| if p { "present" } else { "absent" };
        if mode.has_snapshot() != snapshot.is_some() {
            return Err(TeacherError::Snapshot {
                mode: match mode {
                    TeacherMode::Frozen => "frozen",
                    TeacherMode::Ema { .. } => "ema",
                    TeacherMode::Live => "live",
                },
                expected: presence(mode.has_snapshot()),
                found: presence(snapshot.is_some()),
            });
        }
        Ok(Self { mode, snapshot })
    }

    /// The mode.
    pub fn mode(&self) -> TeacherMode {
        self.mode
    }

    /// The teacher's own weights (`None` for `Live`): what a checkpoint must save.
    pub fn snapshot(&self) -> Option<&M> {
        self.snapshot.as_ref()
    }

    /// The weights to score with, given the student's current (detached) weights `live`.
    pub fn weights<'a>(&'a self, live: &'a M) -> &'a M {
        self.snapshot.as_ref().unwrap_or(live)
    }

    /// Follows one optimizer update of the student (only `Ema` changes), blending every
    /// parameter.
    pub fn after_update<B: Backend>(&mut self, student: &M) -> Result<(), TeacherError>
    where
        M: Module<B>,
    {
        if let TeacherMode::Ema { rate } = self.mode {
            if let Some(teacher) = self.snapshot.take() {
                self.snapshot = Some(ema_blend(teacher, student, rate)?);
            }
        }
        Ok(())
    }

    /// [`Teacher::after_update`] blending only the parameters in `trainable` (sorted, as
    /// [`trainable_params`] returns them): the others never change, so the teacher keeps the
    /// student's tensors for them, shared rather than recomputed. With adapters on a frozen
    /// base (LoRA), the EMA teacher is then a second adapter set over the one base.
    pub fn after_update_trainable<B: Backend>(
        &mut self,
        student: &M,
        trainable: &[ParamId],
    ) -> Result<(), TeacherError>
    where
        M: Module<B>,
    {
        if let TeacherMode::Ema { rate } = self.mode {
            if let Some(teacher) = self.snapshot.take() {
                self.snapshot = Some(blend(teacher, student, rate, Some(trainable))?);
            }
        }
        Ok(())
    }
}

struct TrainableParams {
    ids: Vec<ParamId>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for TrainableParams {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if param.val().is_require_grad() {
            self.ids.push(param.id);
        }
    }
}

/// The ids of the parameters of `model` that require gradients (what an optimizer updates),
/// sorted. A full fine-tune lists every parameter; LoRA only the adapters.
pub fn trainable_params<B: AutodiffBackend, M: Module<B>>(model: &M) -> Vec<ParamId> {
    let mut visitor = TrainableParams { ids: Vec::new() };
    model.visit(&mut visitor);
    visitor.ids.sort();
    visitor.ids
}

struct CollectParams<'a, B: Backend> {
    tensors: TensorContainer<ParamId>,
    ids: Vec<ParamId>,
    only: Option<&'a [ParamId]>,
    _backend: core::marker::PhantomData<B>,
}

impl<B: Backend> ModuleVisitor<B> for CollectParams<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self
            .only
            .is_some_and(|ids| ids.binary_search(&param.id).is_err())
        {
            return;
        }
        self.ids.push(param.id);
        self.tensors
            .register::<B>(param.id, param.val().into_primitive());
    }
}

struct BlendParams<'a, B: Backend> {
    student: TensorContainer<ParamId>,
    rate: f32,
    missing: Option<ParamId>,
    only: Option<&'a [ParamId]>,
    _backend: core::marker::PhantomData<B>,
}

impl<B: Backend> ModuleMapper<B> for BlendParams<'_, B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        if self
            .only
            .is_some_and(|ids| ids.binary_search(&param.id).is_err())
        {
            return param;
        }
        match self.student.remove::<B>(&param.id) {
            Some(student) => {
                let student = Tensor::<B, D>::from_primitive(student);
                let rate = self.rate;
                param.map(|teacher| teacher.mul_scalar(1.0 - rate).add(student.mul_scalar(rate)))
            }
            None => {
                self.missing.get_or_insert(param.id);
                param
            }
        }
    }
}

/// `θ_T ← (1 − rate)·θ_T + rate·θ_S`, parameter by parameter, matched by [`ParamId`].
///
/// The exponential moving average of a model's weights used as a target network (Polyak
/// averaging; e.g. the EMA teacher of BYOL / DINO). Fails, returning no module, if the two
/// modules do not have the same parameter ids.
pub fn ema_blend<B: Backend, M: Module<B>>(
    teacher: M,
    student: &M,
    rate: f32,
) -> Result<M, TeacherError> {
    blend(teacher, student, rate, None)
}

/// [`ema_blend`] over the parameters in `only` (sorted ids; `None`: all of them).
fn blend<B: Backend, M: Module<B>>(
    teacher: M,
    student: &M,
    rate: f32,
    only: Option<&[ParamId]>,
) -> Result<M, TeacherError> {
    let mut collect = CollectParams::<B> {
        tensors: TensorContainer::new(),
        ids: Vec::new(),
        only,
        _backend: core::marker::PhantomData,
    };
    student.visit(&mut collect);
    let mut blend = BlendParams::<B> {
        student: collect.tensors,
        rate,
        missing: None,
        only,
        _backend: core::marker::PhantomData,
    };
    let blended = teacher.map(&mut blend);
    if let Some(id) = blend.missing {
        return Err(TeacherError::ParamMismatch {
            param: format!("{id}"),
            present: "teacher",
            absent: "student",
        });
    }
    if let Some(id) = blend.student.ids().first() {
        return Err(TeacherError::ParamMismatch {
            param: format!("{id}"),
            present: "student",
            absent: "teacher",
        });
    }
    Ok(blended)
}

/// The teacher's view of a response: final hidden states `[N, R, H]` and LM head `[V, H]`.
#[derive(Clone, Debug)]
pub struct TeacherScores<B: Backend> {
    /// Row `r` is the teacher's state that predicts response token `r`.
    pub hidden: Tensor<B, 3>,
    /// The teacher's LM-head weight.
    pub weight: Tensor<B, 2>,
}

impl<B: Backend> TeacherScores<B> {
    /// The fused loss's teacher input (log-probs are made chunk by chunk from these).
    pub fn to_input(&self) -> TeacherInput<B> {
        TeacherInput::Hidden {
            hidden: self.hidden.clone(),
            weight: self.weight.clone(),
        }
    }
}

/// Teacher-forces `response: [N, R]` after the privileged `prompt` and returns the teacher's
/// final hidden states `[N, R, H]` with its LM head `[V, H]`.
///
/// Row `r` predicts response token `r`, exactly like the student's
/// `response_hidden(student_prompt, response)`: that is the alignment by position within the
/// response.
pub fn score<B: Backend, M: PolicyModel<B>>(
    teacher: &M,
    prompt: &M::Prompt,
    response: Tensor<B, 2, Int>,
) -> Result<TeacherScores<B>, TeacherError> {
    let [n, r] = response.dims();
    let weight = teacher.lm_head();
    let [_, h] = weight.dims();
    let hidden = teacher.response_hidden(prompt, response);
    if hidden.dims() != [n, r, h] {
        return Err(TeacherError::Shape {
            tensor: "teacher response_hidden",
            expected: alloc::vec![n, r, h],
            found: hidden.dims().to_vec(),
        });
    }
    Ok(TeacherScores { hidden, weight })
}
