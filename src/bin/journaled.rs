//! The `journaled` binary: see `journaled --help`.

fn main() -> std::process::ExitCode {
    journaled::cli::main()
}
