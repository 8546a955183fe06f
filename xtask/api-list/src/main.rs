//! `train-api-list <rustdoc JSON>`: prints the crate's public items, one a line, as
//! `cargo public-api -ss` does (blanket and auto-trait impls left out).

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(json), None) = (args.next(), args.next()) else {
        eprintln!("usage: train-api-list <rustdoc JSON file>");
        return ExitCode::from(2);
    };
    let built = public_api::Builder::from_rustdoc_json(&json)
        .omit_blanket_impls(true)
        .omit_auto_trait_impls(true)
        .build();
    match built {
        Ok(api) => {
            let mut out = String::new();
            for item in api.items() {
                out.push_str(&item.to_string());
                out.push('\n');
            }
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("train-api-list: {}: {e}", json.to_string_lossy());
            ExitCode::FAILURE
        }
    }
}
