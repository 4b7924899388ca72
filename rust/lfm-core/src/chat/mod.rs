//! Chat prompts: the model's Jinja chat template rendered as transformers renders it.

mod pyjson;
mod strftime;
mod template;

pub use template::{ChatTemplate, neutralise_generation_tags};
