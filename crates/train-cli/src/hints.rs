//! What to do next, for the library errors that have an answer in this CLI's terms: the
//! libraries state the facts (which directory, which case), the CLI knows its flags.

use train_model::{ModelError, OutputRefusal};
use train_runner::RunnerError;

/// The hint for the first error in `e`'s chain that has one.
pub fn hint(e: &anyhow::Error) -> Option<String> {
    e.chain().find_map(|cause| {
        if let Some(r) = cause.downcast_ref::<RunnerError>() {
            runner(r)
        } else {
            cause.downcast_ref::<ModelError>().and_then(model)
        }
    })
}

fn runner(e: &RunnerError) -> Option<String> {
    Some(match e {
        RunnerError::Model(m) => return model(m),
        RunnerError::Locked { .. } => "wait for it to finish or choose another --output".into(),
        RunnerError::OutputNotEmpty { .. } => {
            "pass --resume to continue it, or --yes to start over there".into()
        }
        RunnerError::WouldAbandon { output, .. } => format!(
            "resume from the newest (a bare --resume), or pass --yes to move them to {}/{}/ and \
             continue from here",
            output.display(),
            train_runner::SET_ASIDE_DIR
        ),
        RunnerError::OtherModel { trained_from, .. } => {
            format!("resume with --model {trained_from}")
        }
        _ => return None,
    })
}

fn model(e: &ModelError) -> Option<String> {
    Some(match e {
        ModelError::Output { refusal, .. } => match refusal {
            OutputRefusal::Input | OutputRefusal::Checkpoint | OutputRefusal::NotADirectory => {
                "choose another --output".into()
            }
            OutputRefusal::HoldsModel => {
                "pass --yes to replace it, or choose another --output".into()
            }
        },
        ModelError::UnsupportedPrecision { backend, .. } if backend != "any" => {
            "use --precision fp32 (or auto)".into()
        }
        _ => return None,
    })
}
