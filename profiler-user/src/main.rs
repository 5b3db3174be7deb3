//! The `memscope` binary: parses the command line and runs it; errors are printed as one line
//! per cause and give a non-zero exit code.
use std::process::ExitCode;

fn main() -> ExitCode {
    profiler_user::cli::main()
}
