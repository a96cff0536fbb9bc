fn main() -> std::process::ExitCode {
    cutoverfs::cli::main()
}
