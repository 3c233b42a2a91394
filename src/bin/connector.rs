fn main() -> std::process::ExitCode {
    connector::cli::connector::main()
}
