//! The `fieldsync` binary: parse arguments, run the command, map errors to exit codes.

use clap::Parser;

fn main() {
    let cli = fieldsync::cli::Cli::parse();
    match fieldsync::cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("fieldsync: {e}");
            std::process::exit(e.code);
        }
    }
}
