//! Kluis streaming envelope: segmented AES-256-GCM with an authenticated header
