"""Device wire formats as the simulators write them: a second, independent reading of each manual.

Nothing here is imported from `customs_edge.drivers` (an import-linter contract keeps it so): a table
or encoder shared with a driver turns a misread manual into a passing test suite. Each module names
the document it was written from; byte strings taken from those documents' examples are kept in
tests/fixtures/<device>/ and checked against both the driver's parser and the encoder here.
pymodbus, an independent implementation, frames the Modbus replies.
"""
