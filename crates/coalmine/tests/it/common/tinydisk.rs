//! A small disk that a test can fill: a tmpfs mounted in a private mount namespace (made with
//! `unshare`, so nothing on the machine sees it), kept alive by a holder process so programs can
//! be started in it, killed and started again (`nsenter`). The test fills and frees it through
//! the holder's view of the file system (`/proc/PID/root`).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::{Proc, BIN};

pub struct TinyDisk {
    holder: Child,
    /// Where the tmpfs is mounted, inside the namespace.
    pub dir: PathBuf,
}

impl TinyDisk {
    /// A tmpfs of `size_kib` KiB at `dir` (which must exist), seen only by programs started
    /// with [`TinyDisk::spawn`].
    pub fn mount(dir: &Path, size_kib: u64) -> TinyDisk {
        let script = format!(
            "mount -t tmpfs -o size={size_kib}k tmpfs '{}' && echo mounted && exec sleep 600",
            dir.display()
        );
        let mut holder = Command::new("unshare")
            .args([
                "--mount",
                "--map-root-user",
                "--propagation",
                "private",
                "sh",
                "-c",
                &script,
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("unshare (util-linux)");
        let mut line = String::new();
        BufReader::new(holder.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(
            line.trim(),
            "mounted",
            "could not mount a tmpfs in a private namespace"
        );
        TinyDisk {
            holder,
            dir: dir.to_path_buf(),
        }
    }

    fn outside(&self, name: &str) -> PathBuf {
        let inside = self.dir.join(name);
        PathBuf::from(format!(
            "/proc/{}/root{}",
            self.holder.id(),
            inside.display()
        ))
    }

    /// Starts `coalmine ARGS` inside the namespace, where the tmpfs is.
    pub fn spawn(&self, args: &[&str]) -> Proc {
        let pid = self.holder.id().to_string();
        let mut command = Command::new("nsenter");
        command
            .args([
                "--target",
                &pid,
                "--mount",
                "--user",
                "--preserve-credentials",
                BIN,
            ])
            .args(args);
        Proc::spawn_command(command, args)
    }

    /// Fills the disk to the last byte.
    pub fn fill(&self) {
        let mut f = std::fs::File::create(self.outside("filler")).unwrap();
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.flush();
    }

    /// Frees what [`TinyDisk::fill`] took.
    pub fn free(&self) {
        std::fs::remove_file(self.outside("filler")).unwrap();
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        // The tmpfs goes with the holder's namespace.
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}
