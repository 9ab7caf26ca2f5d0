//! Keyword options from Python, read by name with the CLI's option names (`--sample-rows`
//! is `sample_rows=`); an unknown name is a `ValueError`.

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use crate::error::Error;

/// The keyword options of one call; each read removes its key.
pub struct Options<'py> {
    dict: Bound<'py, PyDict>,
}

impl<'py> Options<'py> {
    /// Wraps a copy of `dict` (`None`: no options).
    pub fn new(py: Python<'py>, dict: Option<&Bound<'py, PyDict>>) -> PyResult<Self> {
        Ok(Self {
            dict: match dict {
                Some(d) => d.copy()?,
                None => PyDict::new(py),
            },
        })
    }

    fn take(&self, key: &str) -> PyResult<Option<Bound<'py, PyAny>>> {
        let value = self.dict.get_item(key)?;
        if value.is_some() {
            self.dict.del_item(key)?;
        }
        Ok(value.filter(|v| !v.is_none()))
    }

    /// Option `key` as a `T`, if given (`None` counts as not given).
    pub fn get<T>(&self, key: &str) -> PyResult<Option<T>>
    where
        T: FromPyObjectOwned<'py>,
    {
        match self.take(key)? {
            None => Ok(None),
            Some(v) => v.extract::<T>().map(Some).map_err(|e| {
                let e: PyErr = e.into();
                Error::invalid(format!(
                    "{key}= has the wrong type ({}): {e}",
                    v.get_type()
                        .name()
                        .map(|n| n.to_string())
                        .unwrap_or_default()
                ))
                .into()
            }),
        }
    }

    /// Option `key` as text: a string, or a number / bool written as the CLI takes it.
    pub fn text(&self, key: &str) -> PyResult<Option<String>> {
        match self.take(key)? {
            None => Ok(None),
            Some(v) if v.is_instance_of::<PyString>() => Ok(Some(v.extract()?)),
            Some(v) => Ok(Some(v.str()?.to_string())),
        }
    }

    /// Option `key`, a list of strings (a single string is a one-element list).
    pub fn list(&self, key: &str) -> PyResult<Vec<String>> {
        match self.take(key)? {
            None => Ok(Vec::new()),
            Some(v) if v.is_instance_of::<PyString>() => Ok(vec![v.extract()?]),
            Some(v) => v.extract().map_err(|_| {
                Error::invalid(format!("{key}= takes a string or a list of strings")).into()
            }),
        }
    }

    /// Option `key`, one of `choices` (`-` and `_` alike), as its index.
    pub fn choice(&self, key: &str, choices: &[&str]) -> PyResult<Option<usize>> {
        let Some(text) = self.text(key)? else {
            return Ok(None);
        };
        let wanted = text.trim().to_ascii_lowercase().replace('_', "-");
        choices
            .iter()
            .position(|c| *c == wanted)
            .map(Some)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "invalid value '{text}' for {key}= (--{}): possible values: {}",
                    key.replace('_', "-"),
                    choices.join(", ")
                ))
                .into()
            })
    }

    /// Sets option `key` to `value` (`None` removes it).
    pub fn dict_put_back(&self, key: &str, value: Option<String>) -> PyResult<()> {
        match value {
            Some(v) => self.dict.set_item(key, v),
            None => {
                if self.dict.contains(key)? {
                    self.dict.del_item(key)?;
                }
                Ok(())
            }
        }
    }

    /// Option `key` as text, left in place for a later read.
    pub fn peek_text(&self, key: &str) -> PyResult<Option<String>> {
        let value = self.text(key)?;
        self.dict_put_back(key, value.clone())?;
        Ok(value)
    }

    /// Fails on any option not read.
    pub fn finish(self, function: &str) -> PyResult<()> {
        let left: Vec<String> = self
            .dict
            .keys()
            .iter()
            .map(|k| k.str().map(|s| s.to_string()).unwrap_or_default())
            .collect();
        if left.is_empty() {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "unknown option(s) of balans.{function}: {} (see help(balans.{function}))",
                left.join(", ")
            ))
            .into())
        }
    }
}
