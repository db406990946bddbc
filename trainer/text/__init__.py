"""Words and prosody: the word pattern, syllables, meter tables, CMU stresses, scansion."""
