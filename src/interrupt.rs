//! Ctrl-C, the way command-line users expect it: while tokens are being generated the first Ctrl-C
//! stops after the current token (the statistics are still printed), and any other Ctrl-C (during
//! loading, quantizing, or a second one) removes the files being written and quits at once with
//! exit status 130. Files being written register here, so an interrupt never leaves half files.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// The exit status of a program stopped by SIGINT (128 + 2), as shells report it.
pub const EXIT_INTERRUPTED: i32 = 130;

/// Set by the first Ctrl-C while generating; the decode loop stops at the next token.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// True while a first Ctrl-C should only set [`INTERRUPTED`] (generation in progress).
static GRACEFUL: AtomicBool = AtomicBool::new(false);

/// Files and then (empty) folders to remove if the program is interrupted.
static CLEANUP: Mutex<(Vec<PathBuf>, Vec<PathBuf>)> = Mutex::new((Vec::new(), Vec::new()));

/// Installs the handler (once per process; later calls do nothing).
pub fn install() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        // A handler that cannot be installed (one already is) leaves the default: the process ends.
        let _ = ctrlc::set_handler(on_ctrl_c);
    });
}

fn on_ctrl_c() {
    if GRACEFUL.load(Ordering::SeqCst) && !INTERRUPTED.swap(true, Ordering::SeqCst) {
        eprintln!("\ninterrupted: stopping after this token (Ctrl-C again to quit now)");
        return;
    }
    clean_up();
    eprintln!("\ninterrupted");
    std::process::exit(EXIT_INTERRUPTED);
}

/// Whether the first Ctrl-C only asks the decode loop to stop (true while generating).
pub fn set_graceful(graceful: bool) {
    GRACEFUL.store(graceful, Ordering::SeqCst);
}

fn with_lists(f: impl FnOnce(&mut (Vec<PathBuf>, Vec<PathBuf>))) {
    let mut lists = CLEANUP.lock().unwrap_or_else(|p| p.into_inner());
    f(&mut lists);
}

/// A file being written: removed if the program is interrupted before [`forget_file`].
pub fn register_file(path: &Path) {
    with_lists(|l| l.0.push(path.to_path_buf()));
}

/// A folder this program created: removed on interrupt if nothing else is left in it.
pub fn register_folder(path: &Path) {
    with_lists(|l| l.1.push(path.to_path_buf()));
}

pub fn forget_file(path: &Path) {
    with_lists(|l| l.0.retain(|p| p != path));
}

pub fn forget_folder(path: &Path) {
    with_lists(|l| l.1.retain(|p| p != path));
}

/// Removes the registered files, then the registered folders that are empty (best effort).
fn clean_up() {
    with_lists(|(files, folders)| {
        for f in files.drain(..) {
            let _ = std::fs::remove_file(f);
        }
        for d in folders.drain(..).rev() {
            let _ = std::fs::remove_dir(d);
        }
    });
}
