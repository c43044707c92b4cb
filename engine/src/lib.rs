//! dlengine's model execution engine.
