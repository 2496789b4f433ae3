//! The real Nitro Secure Module behind `/dev/nsm`.

use aws_nitro_enclaves_nsm_api::driver;

use crate::{Nsm, NsmError, Request, Response};

/// Path of the NSM device inside a Nitro Enclave.
const DEVICE_PATH: &str = "/dev/nsm";

/// The real Nitro Secure Module, reached through `/dev/nsm`.
///
/// Owns the device's file descriptor and closes it when dropped. Requests go
/// through the nsm-api crate's driver (which performs the ioctl); the kernel
/// driver serialises concurrent requests, so one `NsmDevice` can be shared
/// between threads.
#[derive(Debug)]
pub struct NsmDevice {
    /// Open descriptor of `/dev/nsm`; never negative.
    fd: i32,
}

impl NsmDevice {
    /// Opens `/dev/nsm`.
    ///
    /// Fails with [`NsmError::DeviceUnavailable`] outside a Nitro Enclave,
    /// where the device does not exist.
    pub fn open() -> Result<Self, NsmError> {
        let fd = driver::nsm_init();
        if fd >= 0 {
            return Ok(Self { fd });
        }
        // The driver only reports -1; open the path ourselves to learn why.
        let source = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(DEVICE_PATH)
        {
            Err(err) => err,
            Ok(_) => std::io::Error::other("the NSM driver failed to initialise"),
        };
        Err(NsmError::DeviceUnavailable {
            path: DEVICE_PATH,
            source,
        })
    }

    /// The device path this type opens.
    pub const fn path() -> &'static str {
        DEVICE_PATH
    }
}

impl Nsm for NsmDevice {
    fn process(&self, request: Request) -> Response {
        driver::nsm_process_request(self.fd, request)
    }
}

impl Drop for NsmDevice {
    fn drop(&mut self) {
        driver::nsm_exit(self.fd);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_fails_clearly_without_the_device() {
        if std::path::Path::new(DEVICE_PATH).exists() {
            // Inside a real enclave: the device must open and describe itself.
            let nsm = NsmDevice::open().unwrap();
            let description = crate::describe_nsm(&nsm).unwrap();
            assert_eq!(description.max_pcrs, crate::MAX_PCRS);
            return;
        }
        let err = NsmDevice::open().unwrap_err();
        match &err {
            NsmError::DeviceUnavailable { path, source } => {
                assert_eq!(*path, "/dev/nsm");
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            }
            other => panic!("unexpected error {other:?}"),
        }
        let message = err.to_string();
        assert!(message.contains("/dev/nsm"), "{message}");
        assert!(message.contains("Nitro Enclave"), "{message}");
    }
}
