"""Named, versioned model configs. `tiny` holds the small random configs the tests use."""
