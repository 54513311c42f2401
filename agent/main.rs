//! The `fieldsync` binary: parse arguments, run the command, map errors to exit codes.

fn main() {
    let cli = match fieldsync::cli::parse() {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("fieldsync: {e}");
            std::process::exit(e.code);
        }
    };
    match fieldsync::cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("fieldsync: {e}");
            std::process::exit(e.code);
        }
    }
}
