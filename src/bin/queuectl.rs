fn main() -> std::process::ExitCode {
    connector::cli::queuectl::main()
}
