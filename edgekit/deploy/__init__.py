"""Ship a bundle to devices over SSH (OpenSSH + rsync): resumable upload, sha256 check on the device,
runtime install, versioned directories with an atomic ``current`` link, fleets."""
