//! The `govshare` command line: arguments, parsing of values, output, and the commands.

pub(crate) mod args;
pub(crate) mod json;
pub(crate) mod output;
pub(crate) mod parse;
pub(crate) mod run;
pub(crate) mod table;
