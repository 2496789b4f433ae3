//! Writes an EIF (version 4, x86_64, unsigned) from a kernel, a command line
//! and ramdisks, with [`kluis_eif::EifBuilder`]: the VM test's image builder
//! (`tests/vm/run`), which boots the result under QEMU's `nitro-enclave`
//! machine.
//!
//! ```text
//! cargo run -p kluis-eif --example build-eif -- \
//!     --kernel bzImage --cmdline "console=ttyS0" \
//!     --ramdisk init.cpio.gz --ramdisk app.cpio.gz --output image.eif
//! ```
//!
//! Not a replacement for `nitro-cli build-enclave`: no signature section and
//! no metadata section (neither is needed to boot or to measure PCR0-2).

use std::path::PathBuf;
use std::process::ExitCode;

/// Largest input file read (kernel or ramdisk).
const MAX_INPUT: u64 = 512 * 1024 * 1024;

struct Args {
    kernel: PathBuf,
    cmdline: String,
    ramdisks: Vec<PathBuf>,
    output: PathBuf,
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let (mut kernel, mut cmdline, mut output) = (None, None, None);
    let mut ramdisks = Vec::new();
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--kernel" => kernel = Some(PathBuf::from(value()?)),
            "--cmdline" => cmdline = Some(value()?),
            "--ramdisk" => ramdisks.push(PathBuf::from(value()?)),
            "--output" => output = Some(PathBuf::from(value()?)),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if ramdisks.is_empty() {
        return Err("at least one --ramdisk is needed".into());
    }
    Ok(Args {
        kernel: kernel.ok_or("--kernel is needed")?,
        cmdline: cmdline.ok_or("--cmdline is needed")?,
        ramdisks,
        output: output.ok_or("--output is needed")?,
    })
}

fn read(path: &PathBuf) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut data = Vec::new();
    file.take(MAX_INPUT.saturating_add(1))
        .read_to_end(&mut data)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if u64::try_from(data.len()).unwrap_or(u64::MAX) > MAX_INPUT {
        return Err(format!(
            "{} is larger than {MAX_INPUT} bytes",
            path.display()
        ));
    }
    Ok(data)
}

fn run() -> Result<(), String> {
    let args = parse(std::env::args().skip(1))?;
    let kernel = read(&args.kernel)?;
    let mut builder = kluis_eif::EifBuilder::new(&kernel, args.cmdline.as_bytes());
    for path in &args.ramdisks {
        builder = builder.ramdisk(&read(path)?);
    }
    let eif = builder.build().map_err(|e| e.to_string())?;
    // Check our own output the way the verifier's tooling will read it.
    kluis_eif::measure(std::io::Cursor::new(&eif))
        .map_err(|e| format!("the image just built does not measure: {e}"))?;
    std::fs::write(&args.output, &eif).map_err(|e| format!("{}: {e}", args.output.display()))
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("build-eif: {e}");
            ExitCode::from(2)
        }
    }
}
