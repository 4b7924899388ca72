//! `lfm._lfm`: the thin PyO3 layer over lfm-core. Each function converts its arguments to
//! owned Rust values, releases the GIL, calls the core and maps the error.

mod engine;
mod errors;
mod images;
mod preproc;

use pyo3::prelude::*;

#[pymodule]
fn _lfm(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(preproc::validate_options, m)?)?;
    m.add_function(wrap_pyfunction!(preproc::plan, m)?)?;
    m.add_function(wrap_pyfunction!(preproc::grid_info, m)?)?;
    m.add_function(wrap_pyfunction!(preproc::placeholder_text, m)?)?;
    m.add_function(wrap_pyfunction!(preproc::decode, m)?)?;
    m.add_function(wrap_pyfunction!(preproc::preprocess, m)?)?;
    m.add_function(wrap_pyfunction!(preproc::apply_chat_template, m)?)?;
    m.add_function(wrap_pyfunction!(engine::init_ort, m)?)?;
    m.add_function(wrap_pyfunction!(engine::available_providers, m)?)?;
    m.add_function(wrap_pyfunction!(engine::shutdown, m)?)?;
    m.add_function(wrap_pyfunction!(preproc::_panic_for_tests, m)?)?;
    m.add_function(wrap_pyfunction!(preproc::bundled_file, m)?)?;
    m.add_function(wrap_pyfunction!(preproc::tokenize, m)?)?;
    m.add_class::<engine::PyEngine>()?;
    m.add_class::<engine::Stream>()?;
    m.add_function(wrap_pyfunction!(engine::check_grammar, m)?)?;
    Ok(())
}
