//! Hand-rolled argument parsing: a subcommand, `--flag`s and `--name value` options.

use std::str::FromStr;

use crate::Result;

pub struct Args {
    args: Vec<String>,
}

impl Args {
    pub fn from_env() -> Args {
        Args {
            args: std::env::args().skip(1).collect(),
        }
    }

    /// Takes the first argument if it is not an option.
    pub fn subcommand(&mut self) -> Option<String> {
        if self.args.first().is_some_and(|a| !a.starts_with('-')) {
            Some(self.args.remove(0))
        } else {
            None
        }
    }

    pub fn flag(&mut self, name: &str) -> bool {
        let found = self.args.iter().position(|a| a == name);
        found.inspect(|&i| drop(self.args.remove(i))).is_some()
    }

    /// `--name VALUE` or `--name=VALUE`.
    pub fn value<T: FromStr>(&mut self, name: &str) -> Result<Option<T>>
    where
        T::Err: std::fmt::Display,
    {
        let prefix = format!("{name}=");
        let Some(i) = self
            .args
            .iter()
            .position(|a| a == name || a.starts_with(&prefix))
        else {
            return Ok(None);
        };
        let arg = self.args.remove(i);
        let text = match arg.strip_prefix(&prefix) {
            Some(text) => text.to_owned(),
            None if i < self.args.len() => self.args.remove(i),
            None => return Err(format!("{name} needs a value").into()),
        };
        text.parse()
            .map(Some)
            .map_err(|e| format!("{name} {text}: {e}").into())
    }

    /// Everything not consumed yet, to pass on to another command.
    /// `--seed N`, or a seed from the clock, short enough to retype.
    pub fn seed(&mut self) -> Result<u64> {
        match self.value::<u64>("--seed")? {
            Some(seed) => Ok(seed),
            None => {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
                Ok((now.as_nanos() % 1_000_000_000) as u64)
            }
        }
    }

    pub fn rest(self) -> Vec<String> {
        self.args
    }

    /// Fails on anything not consumed.
    pub fn finish(self) -> Result<()> {
        if self.args.is_empty() {
            Ok(())
        } else {
            Err(format!("unexpected argument(s): {}", self.args.join(" ")).into())
        }
    }
}
