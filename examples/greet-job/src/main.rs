//! `greet-job`: a run-to-completion wasi:cli/command guest. It writes to both stdout and stderr
//! and exits with `EXIT_CODE` when set, so tests can check log capture and exit statuses.

use std::process::ExitCode;

fn main() -> ExitCode {
    println!("greet-job: starting");
    let name = std::env::var("NAME").unwrap_or_else(|_| "world".into());
    for step in 1..=3 {
        println!("greet-job: step {step}/3, hello {name}");
    }
    eprintln!("greet-job: this line goes to stderr");

    match std::env::var("EXIT_CODE").map(|code| code.parse::<u8>()) {
        Ok(Ok(code)) => {
            println!("greet-job: exiting with {code}");
            // `std::process::exit` can only tell WASI 0.2 success from failure (any non-zero
            // code reaches the host as 1); `exit-with-code` carries the code itself.
            wasip2::cli::exit::exit_with_code(code);
            unreachable!("exit-with-code does not return")
        }
        Ok(Err(e)) => {
            eprintln!("greet-job: EXIT_CODE must be an integer in 0..=255 ({e}); ignoring it");
            ExitCode::SUCCESS
        }
        Err(_) => {
            println!("greet-job: done");
            ExitCode::SUCCESS
        }
    }
}
