//! `genesys-fake`: run a local fake Genesys Cloud until Ctrl-C.
//!
//! ```text
//! genesys-fake [--token-lifetime SECS] [--token-latency-ms MS]
//! ```

use std::process::ExitCode;
use std::time::Duration;

use genesys_fake::FakeGenesys;

const USAGE: &str = "usage: genesys-fake [--token-lifetime SECS] [--token-latency-ms MS]";

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<genesys_fake::FakeBuilder, String> {
    let mut builder = FakeGenesys::builder();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_owned(), Some(v.to_owned())),
            None => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Result<u64, String> {
            let v = inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{name} needs a value"))?;
            v.parse::<u64>()
                .map_err(|_| format!("{name}: not a non-negative integer: {v:?}"))
        };
        match flag.as_str() {
            "--token-lifetime" => {
                builder = builder.token_lifetime(Duration::from_secs(value("--token-lifetime")?));
            }
            "--token-latency-ms" => {
                builder =
                    builder.token_latency(Duration::from_millis(value("--token-latency-ms")?));
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument: {other}")),
        }
    }
    Ok(builder)
}

#[tokio::main]
async fn main() -> ExitCode {
    let builder = match parse_args(std::env::args().skip(1)) {
        Ok(b) => b,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("{e}");
            }
            eprintln!("{USAGE}");
            return if e.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            };
        }
    };
    let fake = match builder.start().await {
        Ok(f) => f,
        Err(e) => {
            eprintln!("genesys-fake: could not start: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("login URI:     {}", fake.login_uri());
    println!("API URI:       {}", fake.api_uri());
    println!("token URL:     {}", fake.token_url());
    println!("client id:     {}", fake.client_id());
    println!("client secret: {}", fake.client_secret());
    println!("press Ctrl-C to stop");
    if let Err(e) = tokio::signal::ctrl_c().await {
        eprintln!("genesys-fake: cannot wait for Ctrl-C: {e}");
    }
    fake.shutdown().await;
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::parse_args;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_flags() {
        assert!(parse_args(args(&[])).is_ok());
        assert!(parse_args(args(&["--token-lifetime", "5", "--token-latency-ms=20"])).is_ok());
        assert!(parse_args(args(&["--token-lifetime"])).is_err());
        assert!(parse_args(args(&["--token-lifetime", "x"])).is_err());
        assert!(parse_args(args(&["--bogus"])).is_err());
    }
}
